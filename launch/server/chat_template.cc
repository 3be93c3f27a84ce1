#include "launch/server/chat_template.h"

#include <cctype>
#include <charconv>
#include <cstdint>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

namespace ef::launch {

using json = nlohmann::json;

// --- the Jinja subset -------------------------------------------------------------------------
//
// Rendering errors travel as TemplateError exceptions inside this file only; Apply() and the
// loaders turn them into Status, so nothing crosses the library boundary.
namespace {

struct TemplateError {
  std::string message;
};
[[noreturn]] void Fail(std::string m) { throw TemplateError{std::move(m)}; }

// A value: JSON plus "undefined" (a missing variable, attribute or key).
struct Value {
  json j;
  bool defined = true;
  static Value Undefined() { return Value{json(), false}; }
};

bool Truthy(const Value& v) {
  if (!v.defined || v.j.is_null()) return false;
  if (v.j.is_boolean()) return v.j.get<bool>();
  if (v.j.is_number()) return v.j.get<double>() != 0;
  if (v.j.is_string() || v.j.is_array() || v.j.is_object()) return !v.j.empty();
  return true;
}

std::string ToText(const Value& v) {
  if (!v.defined || v.j.is_null()) return v.defined ? "None" : "";
  if (v.j.is_string()) return v.j.get<std::string>();
  if (v.j.is_boolean()) return v.j.get<bool>() ? "True" : "False";
  if (v.j.is_number_integer()) return std::to_string(v.j.get<int64_t>());
  return v.j.dump();
}

// --- expressions ---

struct Expr {
  enum Kind { kLiteral, kVar, kAttr, kIndex, kSlice, kCall, kFilter, kTest, kUnary, kBinary, kTernary, kList };
  Kind kind = kLiteral;
  json literal;
  std::string name;                         // variable, attribute, filter, test, operator
  std::vector<std::unique_ptr<Expr>> args;  // operands / call arguments (args[0] is the callee for calls)
  bool negate = false;                      // `is not`
};
using ExprPtr = std::unique_ptr<Expr>;

struct Token {
  enum Kind { kName, kString, kNumber, kOp, kEnd } kind = kEnd;
  std::string text;
  json number;
};

std::vector<Token> Lex(const std::string& s) {
  std::vector<Token> out;
  size_t i = 0;
  while (i < s.size()) {
    const char c = s[i];
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      out.push_back({Token::kName, s.substr(i, j - i), {}});
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      bool is_float = false;
      while (j < s.size() && (std::isdigit(static_cast<unsigned char>(s[j])) || s[j] == '.')) {
        if (s[j] == '.') {
          if (j + 1 >= s.size() || !std::isdigit(static_cast<unsigned char>(s[j + 1]))) break;
          is_float = true;
        }
        ++j;
      }
      const std::string t = s.substr(i, j - i);
      // from_chars, not stoll/stod: a literal out of range is a template error, not an exception
      // that would end the process.
      json number;
      std::from_chars_result r{};
      if (is_float) {
        double d = 0;
        r = std::from_chars(t.data(), t.data() + t.size(), d);
        number = d;
      } else {
        int64_t n = 0;
        r = std::from_chars(t.data(), t.data() + t.size(), n);
        number = n;
      }
      if (r.ec != std::errc() || r.ptr != t.data() + t.size()) Fail("number literal " + t + " is out of range");
      out.push_back({Token::kNumber, t, std::move(number)});
      i = j;
    } else if (c == '\'' || c == '"') {
      std::string v;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] == '\\' && j + 1 < s.size()) {
          const char e = s[++j];
          v += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
        } else {
          v += s[j];
        }
      }
      if (j >= s.size()) Fail("unterminated string literal");
      out.push_back({Token::kString, v, {}});
      i = j + 1;
    } else {
      static const char* kTwo[] = {"==", "!=", "<=", ">=", "//", "**"};
      bool two = false;
      for (const char* op : kTwo) {
        if (s.compare(i, 2, op) == 0) {
          out.push_back({Token::kOp, op, {}});
          i += 2;
          two = true;
          break;
        }
      }
      if (two) continue;
      if (std::string("()[]{}.,:|+-*/%~<>=").find(c) == std::string::npos)
        Fail(std::string("unexpected character '") + c + "' in an expression");
      out.push_back({Token::kOp, std::string(1, c), {}});
      ++i;
    }
  }
  out.push_back({Token::kEnd, "", {}});
  return out;
}

class Parser {
 public:
  explicit Parser(const std::string& src) : toks_(Lex(src)) {}

  ExprPtr Expression() { return Ternary(); }
  bool AtEnd() const { return toks_[pos_].kind == Token::kEnd; }
  bool IsName(const char* n) const { return toks_[pos_].kind == Token::kName && toks_[pos_].text == n; }
  bool IsOp(const char* o) const { return toks_[pos_].kind == Token::kOp && toks_[pos_].text == o; }
  std::string TakeName() {
    if (toks_[pos_].kind != Token::kName) Fail("expected a name, got '" + toks_[pos_].text + "'");
    return toks_[pos_++].text;
  }
  void Expect(const char* op) {
    if (!IsOp(op)) Fail(std::string("expected '") + op + "', got '" + toks_[pos_].text + "'");
    ++pos_;
  }
  void ExpectName(const char* n) {
    if (!IsName(n)) Fail(std::string("expected '") + n + "', got '" + toks_[pos_].text + "'");
    ++pos_;
  }
  void ExpectEnd() {
    if (!AtEnd()) Fail("unexpected '" + toks_[pos_].text + "'");
  }

 private:
  static ExprPtr Make(Expr::Kind k, std::string name = {}) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->name = std::move(name);
    return e;
  }
  static ExprPtr Bin(std::string op, ExprPtr a, ExprPtr b) {
    auto e = Make(Expr::kBinary, std::move(op));
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }
  ExprPtr Ternary() {
    ExprPtr a = Or();
    if (IsName("if")) {
      ++pos_;
      ExprPtr cond = Or();
      ExprPtr other;
      if (IsName("else")) {
        ++pos_;
        other = Ternary();
      } else {
        other = Make(Expr::kLiteral);
      }
      auto e = Make(Expr::kTernary);
      e->args.push_back(std::move(cond));
      e->args.push_back(std::move(a));
      e->args.push_back(std::move(other));
      return e;
    }
    return a;
  }
  ExprPtr Or() {
    ExprPtr a = And();
    while (IsName("or")) {
      ++pos_;
      a = Bin("or", std::move(a), And());
    }
    return a;
  }
  ExprPtr And() {
    ExprPtr a = Not();
    while (IsName("and")) {
      ++pos_;
      a = Bin("and", std::move(a), Not());
    }
    return a;
  }
  ExprPtr Not() {
    if (IsName("not")) {
      ++pos_;
      auto e = Make(Expr::kUnary, "not");
      e->args.push_back(Not());
      return e;
    }
    return Compare();
  }
  ExprPtr Compare() {
    ExprPtr a = Concat();
    for (;;) {
      static const char* kOps[] = {"==", "!=", "<=", ">=", "<", ">"};
      bool matched = false;
      for (const char* op : kOps) {
        if (IsOp(op)) {
          ++pos_;
          a = Bin(op, std::move(a), Concat());
          matched = true;
          break;
        }
      }
      if (matched) continue;
      if (IsName("in")) {
        ++pos_;
        a = Bin("in", std::move(a), Concat());
      } else if (IsName("not") && toks_[pos_ + 1].kind == Token::kName && toks_[pos_ + 1].text == "in") {
        pos_ += 2;
        auto e = Make(Expr::kUnary, "not");
        e->args.push_back(Bin("in", std::move(a), Concat()));
        a = std::move(e);
      } else if (IsName("is")) {
        ++pos_;
        auto e = Make(Expr::kTest);
        if (IsName("not")) {
          ++pos_;
          e->negate = true;
        }
        e->name = TakeName();
        e->args.push_back(std::move(a));
        if (e->name == "equalto" || e->name == "sameas") e->args.push_back(Concat());
        a = std::move(e);
      } else {
        return a;
      }
    }
  }
  ExprPtr Concat() {
    ExprPtr a = Sum();
    while (IsOp("~")) {
      ++pos_;
      a = Bin("~", std::move(a), Sum());
    }
    return a;
  }
  ExprPtr Sum() {
    ExprPtr a = Product();
    while (IsOp("+") || IsOp("-")) {
      const std::string op = toks_[pos_++].text;
      a = Bin(op, std::move(a), Product());
    }
    return a;
  }
  ExprPtr Product() {
    ExprPtr a = Unary();
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      const std::string op = toks_[pos_++].text;
      a = Bin(op, std::move(a), Unary());
    }
    return a;
  }
  ExprPtr Unary() {
    if (IsOp("-")) {
      ++pos_;
      auto e = Make(Expr::kUnary, "-");
      e->args.push_back(Unary());
      return e;
    }
    return Postfix(Primary());
  }
  std::vector<ExprPtr> CallArgs() {
    std::vector<ExprPtr> args;
    Expect("(");
    while (!IsOp(")")) {
      // keyword arguments are accepted and passed positionally
      if (toks_[pos_].kind == Token::kName && toks_[pos_ + 1].kind == Token::kOp && toks_[pos_ + 1].text == "=")
        pos_ += 2;
      args.push_back(Expression());
      if (!IsOp(")")) Expect(",");
    }
    Expect(")");
    return args;
  }
  ExprPtr Postfix(ExprPtr a) {
    for (;;) {
      if (IsOp(".")) {
        ++pos_;
        auto e = Make(Expr::kAttr, TakeName());
        e->args.push_back(std::move(a));
        a = std::move(e);
      } else if (IsOp("[")) {
        ++pos_;
        ExprPtr lo, hi;
        if (!IsOp(":")) lo = Expression();
        if (IsOp(":")) {
          ++pos_;
          if (!IsOp("]")) hi = Expression();
          auto e = Make(Expr::kSlice);
          e->args.push_back(std::move(a));
          e->args.push_back(lo ? std::move(lo) : Make(Expr::kLiteral));
          e->args.push_back(hi ? std::move(hi) : Make(Expr::kLiteral));
          a = std::move(e);
        } else {
          auto e = Make(Expr::kIndex);
          e->args.push_back(std::move(a));
          e->args.push_back(std::move(lo));
          a = std::move(e);
        }
        Expect("]");
      } else if (IsOp("(")) {
        auto e = Make(Expr::kCall);
        e->args.push_back(std::move(a));
        for (auto& arg : CallArgs()) e->args.push_back(std::move(arg));
        a = std::move(e);
      } else if (IsOp("|")) {
        ++pos_;
        auto e = Make(Expr::kFilter, TakeName());
        e->args.push_back(std::move(a));
        if (IsOp("("))
          for (auto& arg : CallArgs()) e->args.push_back(std::move(arg));
        a = std::move(e);
      } else {
        return a;
      }
    }
  }
  ExprPtr Primary() {
    const Token& t = toks_[pos_];
    if (t.kind == Token::kString) {
      ++pos_;
      auto e = Make(Expr::kLiteral);
      e->literal = t.text;
      // adjacent string literals concatenate
      while (toks_[pos_].kind == Token::kString) e->literal = e->literal.get<std::string>() + toks_[pos_++].text;
      return e;
    }
    if (t.kind == Token::kNumber) {
      ++pos_;
      auto e = Make(Expr::kLiteral);
      e->literal = t.number;
      return e;
    }
    if (t.kind == Token::kName) {
      ++pos_;
      auto e = Make(Expr::kLiteral);
      if (t.text == "true" || t.text == "True") {
        e->literal = true;
      } else if (t.text == "false" || t.text == "False") {
        e->literal = false;
      } else if (t.text == "none" || t.text == "None") {
        e->literal = nullptr;
      } else {
        e->kind = Expr::kVar;
        e->name = t.text;
      }
      return e;
    }
    if (IsOp("(")) {
      ++pos_;
      ExprPtr e = Expression();
      Expect(")");
      return e;
    }
    if (IsOp("[")) {
      ++pos_;
      auto e = Make(Expr::kList);
      while (!IsOp("]")) {
        e->args.push_back(Expression());
        if (!IsOp("]")) Expect(",");
      }
      Expect("]");
      return e;
    }
    Fail("unexpected '" + t.text + "' in an expression");
  }

  std::vector<Token> toks_;
  size_t pos_ = 0;
};

// --- statements ---

struct Node {
  enum Kind { kText, kOutput, kIf, kFor, kSet } kind = kText;
  std::string text;            // kText
  std::vector<ExprPtr> exprs;  // kOutput: [expr]; kIf: conditions; kFor: [iter]; kSet: [value]
  std::vector<std::vector<std::unique_ptr<Node>>> bodies;  // kIf: one per condition (+ else); kFor: [body, else]
  std::string var;                                         // kFor loop variable, kSet target
};
using Body = std::vector<std::unique_ptr<Node>>;

struct Tag {
  enum Kind { kText, kOutput, kStmt } kind;
  std::string content;
};

// Splits the source into text, {{ }} and {% %} pieces, applying '-' whitespace control and
// HF's trim_blocks + lstrip_blocks (the environment apply_chat_template uses).
std::vector<Tag> Split(const std::string& src) {
  std::vector<Tag> tags;
  size_t i = 0;
  bool trim_next = false;     // strip leading whitespace of the next text ('-' on the previous tag)
  bool trim_newline = false;  // trim_blocks: drop one newline after a block tag
  while (i <= src.size()) {
    size_t open = src.find('{', i);
    while (open != std::string::npos && open + 1 < src.size() && src[open + 1] != '{' && src[open + 1] != '%' &&
           src[open + 1] != '#')
      open = src.find('{', open + 1);
    if (open != std::string::npos && open + 1 >= src.size()) open = std::string::npos;
    std::string text = src.substr(i, open == std::string::npos ? std::string::npos : open - i);
    // Whether `text` begins a line (for lstrip_blocks when it is all blanks).
    bool line_start = i == 0 || src[i - 1] == '\n';
    if (trim_next) {
      size_t k = 0;
      while (k < text.size() && std::isspace(static_cast<unsigned char>(text[k]))) {
        if (text[k] == '\n') line_start = true;
        ++k;
      }
      text.erase(0, k);
    } else if (trim_newline && !text.empty() && text[0] == '\n') {
      text.erase(0, 1);
      line_start = true;
    }
    if (open == std::string::npos) {
      if (!text.empty()) tags.push_back({Tag::kText, text});
      break;
    }
    const char kind = src[open + 1];
    const bool strip_before = open + 2 < src.size() && src[open + 2] == '-';
    if (strip_before) {
      while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
    } else if (kind != '{') {
      // lstrip_blocks: blanks between a line start and a block tag go.
      size_t k = text.size();
      while (k > 0 && (text[k - 1] == ' ' || text[k - 1] == '\t')) --k;
      if (k > 0 ? text[k - 1] == '\n' : line_start) text.resize(k);
    }
    if (!text.empty()) tags.push_back({Tag::kText, text});
    const std::string close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    const size_t end = src.find(close, open + 2);
    if (end == std::string::npos) Fail("unterminated '" + src.substr(open, 2) + "' tag");
    const bool strip_after = end > open + 2 && src[end - 1] == '-';
    std::string inner = src.substr(open + 2, end - open - 2);
    if (strip_before && !inner.empty()) inner.erase(0, 1);
    if (strip_after && !inner.empty()) inner.pop_back();
    if (kind == '{') tags.push_back({Tag::kOutput, inner});
    if (kind == '%') tags.push_back({Tag::kStmt, inner});
    trim_next = strip_after;
    trim_newline = kind != '{';
    i = end + 2;
  }
  return tags;
}

std::string FirstWord(const std::string& s, std::string* rest) {
  size_t b = 0;
  while (b < s.size() && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  size_t e = b;
  while (e < s.size() && (std::isalnum(static_cast<unsigned char>(s[e])) || s[e] == '_')) ++e;
  *rest = s.substr(e);
  return s.substr(b, e - b);
}

// Parses tags[pos..] until one of `stops` (returned in *stop with its rest in *stop_rest).
Body ParseBody(const std::vector<Tag>& tags, size_t& pos, const std::vector<std::string>& stops, std::string* stop,
               std::string* stop_rest) {
  Body body;
  while (pos < tags.size()) {
    const Tag& t = tags[pos++];
    if (t.kind == Tag::kText) {
      auto n = std::make_unique<Node>();
      n->text = t.content;
      body.push_back(std::move(n));
      continue;
    }
    if (t.kind == Tag::kOutput) {
      auto n = std::make_unique<Node>();
      n->kind = Node::kOutput;
      Parser p(t.content);
      n->exprs.push_back(p.Expression());
      p.ExpectEnd();
      body.push_back(std::move(n));
      continue;
    }
    std::string rest;
    const std::string word = FirstWord(t.content, &rest);
    for (const std::string& s : stops) {
      if (word == s) {
        *stop = word;
        *stop_rest = rest;
        return body;
      }
    }
    auto n = std::make_unique<Node>();
    if (word == "if") {
      n->kind = Node::kIf;
      std::string cond = rest;
      for (;;) {
        Parser p(cond);
        n->exprs.push_back(p.Expression());
        p.ExpectEnd();
        std::string s, r;
        n->bodies.push_back(ParseBody(tags, pos, {"elif", "else", "endif"}, &s, &r));
        if (s == "elif") {
          cond = r;
          continue;
        }
        if (s == "else") {
          n->bodies.push_back(ParseBody(tags, pos, {"endif"}, &s, &r));
        }
        if (s != "endif") Fail("'if' without 'endif'");
        break;
      }
    } else if (word == "for") {
      n->kind = Node::kFor;
      Parser p(rest);
      n->var = p.TakeName();
      if (p.IsOp(",")) Fail("'for a, b in ...' is not supported");
      p.ExpectName("in");
      n->exprs.push_back(p.Expression());
      p.ExpectEnd();
      std::string s, r;
      n->bodies.push_back(ParseBody(tags, pos, {"else", "endfor"}, &s, &r));
      if (s == "else") n->bodies.push_back(ParseBody(tags, pos, {"endfor"}, &s, &r));
      if (s != "endfor") Fail("'for' without 'endfor'");
    } else if (word == "set") {
      n->kind = Node::kSet;
      Parser p(rest);
      n->var = p.TakeName();
      if (p.IsOp(".")) Fail("'set' of an attribute (namespace) is not supported");
      p.Expect("=");
      n->exprs.push_back(p.Expression());
      p.ExpectEnd();
    } else {
      Fail("the tag '{% " + word + " %}' is not supported");
    }
    body.push_back(std::move(n));
  }
  if (!stops.empty()) Fail("missing '{% " + stops.back() + " %}'");
  return body;
}

// --- evaluation ---

class Renderer {
 public:
  explicit Renderer(json globals) { scopes_.push_back(std::move(globals)); }

  void Run(const Body& body, std::string* out) {
    for (const auto& n : body) {
      switch (n->kind) {
        case Node::kText:
          *out += n->text;
          break;
        case Node::kOutput:
          *out += ToText(Eval(*n->exprs[0]));
          break;
        case Node::kIf: {
          size_t i = 0;
          for (; i < n->exprs.size(); ++i) {
            if (Truthy(Eval(*n->exprs[i]))) break;
          }
          if (i < n->bodies.size()) Run(n->bodies[i], out);
          break;
        }
        case Node::kFor: {
          Value it = Eval(*n->exprs[0]);
          json items = json::array();
          if (it.j.is_array()) {
            items = it.j;
          } else if (it.j.is_object()) {
            for (auto& [k, v] : it.j.items()) items.push_back(k);
          } else if (it.j.is_string()) {
            for (char c : it.j.get<std::string>()) items.push_back(std::string(1, c));
          } else if (it.defined && !it.j.is_null()) {
            Fail("cannot iterate over " + std::string(it.j.type_name()));
          }
          if (items.empty()) {
            if (n->bodies.size() > 1) Run(n->bodies[1], out);
            break;
          }
          for (size_t i = 0; i < items.size(); ++i) {
            json scope = json::object();
            scope[n->var] = items[i];
            scope["loop"] = {{"index0", i},
                             {"index", i + 1},
                             {"first", i == 0},
                             {"last", i + 1 == items.size()},
                             {"length", items.size()},
                             {"revindex", items.size() - i},
                             {"revindex0", items.size() - i - 1}};
            scopes_.push_back(std::move(scope));
            Run(n->bodies[0], out);
            // `set` inside a loop stays in the loop (Jinja scoping).
            scopes_.pop_back();
          }
          break;
        }
        case Node::kSet:
          scopes_.back()[n->var] = Eval(*n->exprs[0]).j;
          break;
      }
    }
  }

 private:
  Value Lookup(const std::string& name) const {
    for (auto s = scopes_.rbegin(); s != scopes_.rend(); ++s) {
      auto it = s->find(name);
      if (it != s->end()) return Value{*it};
    }
    return Value::Undefined();
  }

  static Value Member(const Value& obj, const json& key) {
    if (obj.j.is_object() && key.is_string()) {
      auto it = obj.j.find(key.get<std::string>());
      return it == obj.j.end() ? Value::Undefined() : Value{*it};
    }
    if ((obj.j.is_array() || obj.j.is_string()) && key.is_number_integer()) {
      const int64_t n = static_cast<int64_t>(obj.j.is_array() ? obj.j.size() : obj.j.get<std::string>().size());
      int64_t i = key.get<int64_t>();
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::Undefined();
      if (obj.j.is_array()) return Value{obj.j[static_cast<size_t>(i)]};
      return Value{std::string(1, obj.j.get<std::string>()[static_cast<size_t>(i)])};
    }
    if (!obj.defined)
      Fail("attribute '" + (key.is_string() ? key.get<std::string>() : key.dump()) + "' of an undefined value");
    return Value::Undefined();
  }

  static std::string Str(const Value& v, const char* what) {
    if (!v.j.is_string()) Fail(std::string(what) + " needs a string");
    return v.j.get<std::string>();
  }

  static std::string Strip(std::string s, const std::string& chars, bool left, bool right) {
    auto in = [&](char c) {
      return chars.empty() ? std::isspace(static_cast<unsigned char>(c)) != 0 : chars.find(c) != std::string::npos;
    };
    if (right)
      while (!s.empty() && in(s.back())) s.pop_back();
    size_t b = 0;
    if (left)
      while (b < s.size() && in(s[b])) ++b;
    return s.substr(b);
  }

  Value CallMethod(const Value& self, const std::string& m, const std::vector<Value>& a) {
    auto arg = [&](size_t i) { return i < a.size() ? a[i] : Value::Undefined(); };
    if (self.j.is_string()) {
      const std::string s = self.j.get<std::string>();
      if (m == "strip" || m == "lstrip" || m == "rstrip") {
        const std::string chars = a.empty() ? "" : Str(a[0], m.c_str());
        return Value{Strip(s, chars, m != "rstrip", m != "lstrip")};
      }
      if (m == "startswith") return Value{s.rfind(Str(arg(0), "startswith"), 0) == 0};
      if (m == "endswith") {
        const std::string x = Str(arg(0), "endswith");
        return Value{s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0};
      }
      if (m == "upper" || m == "lower") {
        std::string r = s;
        for (char& c : r) c = static_cast<char>(m == "upper" ? std::toupper(c) : std::tolower(c));
        return Value{r};
      }
      if (m == "split") {
        json parts = json::array();
        if (a.empty()) {
          std::istringstream in(s);
          std::string w;
          while (in >> w) parts.push_back(w);
        } else {
          const std::string sep = Str(a[0], "split");
          if (sep.empty()) Fail("split with an empty separator");
          size_t b = 0;
          for (size_t at; (at = s.find(sep, b)) != std::string::npos; b = at + sep.size())
            parts.push_back(s.substr(b, at - b));
          parts.push_back(s.substr(b));
        }
        return Value{parts};
      }
      if (m == "replace") {
        const std::string from = Str(arg(0), "replace"), to = Str(arg(1), "replace");
        if (from.empty()) return self;
        std::string r;
        size_t b = 0;
        for (size_t at; (at = s.find(from, b)) != std::string::npos; b = at + from.size())
          r += s.substr(b, at - b) + to;
        return Value{r + s.substr(b)};
      }
    }
    if (self.j.is_object()) {
      if (m == "get") {
        Value v = Member(self, arg(0).j);
        return v.defined ? v : (a.size() > 1 ? a[1] : Value{nullptr});
      }
      if (m == "items" || m == "keys" || m == "values") {
        json r = json::array();
        for (auto& [k, v] : self.j.items()) r.push_back(m == "items" ? json::array({k, v}) : m == "keys" ? json(k) : v);
        return Value{r};
      }
    }
    Fail("method '" + m + "' is not supported on " + std::string(self.defined ? self.j.type_name() : "undefined"));
  }

  Value Filter(const std::string& f, const Value& v, const std::vector<Value>& a) {
    if (f == "trim") return Value{Strip(ToText(v), "", true, true)};
    if (f == "length" || f == "count") {
      if (v.j.is_string()) return Value{v.j.get<std::string>().size()};
      return Value{v.j.size()};
    }
    if (f == "upper" || f == "lower") return CallMethod(Value{ToText(v)}, f, {});
    if (f == "string") return Value{ToText(v)};
    if (f == "tojson") return Value{v.j.dump()};
    if (f == "default" || f == "d") return v.defined ? v : (a.empty() ? Value{""} : a[0]);
    if (f == "first" && v.j.is_array()) return v.j.empty() ? Value::Undefined() : Value{v.j.front()};
    if (f == "last" && v.j.is_array()) return v.j.empty() ? Value::Undefined() : Value{v.j.back()};
    if (f == "join" && v.j.is_array()) {
      const std::string sep = a.empty() ? "" : ToText(a[0]);
      std::string r;
      for (size_t i = 0; i < v.j.size(); ++i) r += (i ? sep : "") + ToText(Value{v.j[i]});
      return Value{r};
    }
    Fail("the filter '" + f + "' is not supported");
  }

  Value Eval(const Expr& e) {
    switch (e.kind) {
      case Expr::kLiteral:
        return Value{e.literal};
      case Expr::kVar:
        return Lookup(e.name);
      case Expr::kList: {
        json r = json::array();
        for (const auto& a : e.args) r.push_back(Eval(*a).j);
        return Value{r};
      }
      case Expr::kAttr:
        return Member(Eval(*e.args[0]), e.name);
      case Expr::kIndex:
        return Member(Eval(*e.args[0]), Eval(*e.args[1]).j);
      case Expr::kSlice: {
        Value obj = Eval(*e.args[0]);
        Value lo = Eval(*e.args[1]), hi = Eval(*e.args[2]);
        const bool str = obj.j.is_string();
        if (!str && !obj.j.is_array()) Fail("slice of a non-sequence");
        const int64_t n = static_cast<int64_t>(str ? obj.j.get<std::string>().size() : obj.j.size());
        auto clamp = [n](const Value& v, int64_t dflt) {
          if (v.j.is_null()) return dflt;
          int64_t i = v.j.get<int64_t>();
          if (i < 0) i += n;
          return std::max<int64_t>(0, std::min(i, n));
        };
        const int64_t b = clamp(lo, 0), en = std::max(b, clamp(hi, n));
        if (str) return Value{obj.j.get<std::string>().substr(b, en - b)};
        return Value{json(obj.j.begin() + b, obj.j.begin() + en)};
      }
      case Expr::kCall: {
        std::vector<Value> args;
        for (size_t i = 1; i < e.args.size(); ++i) args.push_back(Eval(*e.args[i]));
        const Expr& callee = *e.args[0];
        if (callee.kind == Expr::kVar && callee.name == "raise_exception")
          Fail("template error: " + (args.empty() ? std::string("raised") : ToText(args[0])));
        if (callee.kind == Expr::kAttr) return CallMethod(Eval(*callee.args[0]), callee.name, args);
        Fail("calling '" + callee.name + "' is not supported");
      }
      case Expr::kFilter: {
        std::vector<Value> args;
        for (size_t i = 1; i < e.args.size(); ++i) args.push_back(Eval(*e.args[i]));
        return Filter(e.name, Eval(*e.args[0]), args);
      }
      case Expr::kTest: {
        Value v = Eval(*e.args[0]);
        bool r;
        if (e.name == "defined") {
          r = v.defined;
        } else if (e.name == "undefined") {
          r = !v.defined;
        } else if (e.name == "none") {
          r = v.defined && v.j.is_null();
        } else if (e.name == "string") {
          r = v.j.is_string();
        } else if (e.name == "number") {
          r = v.j.is_number();
        } else if (e.name == "mapping") {
          r = v.j.is_object();
        } else if (e.name == "iterable" || e.name == "sequence") {
          r = v.j.is_array() || v.j.is_string() || v.j.is_object();
        } else if (e.name == "true" || e.name == "false") {
          r = v.j.is_boolean() && v.j.get<bool>() == (e.name == "true");
        } else if (e.name == "equalto" || e.name == "sameas") {
          r = v.j == Eval(*e.args[1]).j;
        } else if (e.name == "even" || e.name == "odd") {
          r = v.j.is_number_integer() && (v.j.get<int64_t>() % 2 == 0) == (e.name == "even");
        } else {
          Fail("the test 'is " + e.name + "' is not supported");
        }
        return Value{e.negate ? !r : r};
      }
      case Expr::kUnary: {
        Value v = Eval(*e.args[0]);
        if (e.name == "not") return Value{!Truthy(v)};
        if (!v.j.is_number()) Fail("unary minus of a non-number");
        return v.j.is_number_integer() ? Value{-v.j.get<int64_t>()} : Value{-v.j.get<double>()};
      }
      case Expr::kBinary: {
        const std::string& op = e.name;
        if (op == "and") {
          Value a = Eval(*e.args[0]);
          return Truthy(a) ? Eval(*e.args[1]) : a;
        }
        if (op == "or") {
          Value a = Eval(*e.args[0]);
          return Truthy(a) ? a : Eval(*e.args[1]);
        }
        Value a = Eval(*e.args[0]), b = Eval(*e.args[1]);
        if (op == "~") return Value{ToText(a) + ToText(b)};
        if (op == "==") return Value{a.j == b.j && a.defined == b.defined};
        if (op == "!=") return Value{!(a.j == b.j && a.defined == b.defined)};
        if (op == "in") {
          if (b.j.is_string()) return Value{b.j.get<std::string>().find(ToText(a)) != std::string::npos};
          if (b.j.is_array()) return Value{std::find(b.j.begin(), b.j.end(), a.j) != b.j.end()};
          if (b.j.is_object()) return Value{a.j.is_string() && b.j.contains(a.j.get<std::string>())};
          return Value{false};
        }
        if (op == "+" && a.j.is_string() && b.j.is_string())
          return Value{a.j.get<std::string>() + b.j.get<std::string>()};
        if (op == "+" && a.j.is_array() && b.j.is_array()) {
          json r = a.j;
          for (const auto& x : b.j) r.push_back(x);
          return Value{r};
        }
        if (a.j.is_number() && b.j.is_number()) {
          const bool ints = a.j.is_number_integer() && b.j.is_number_integer();
          const double x = a.j.get<double>(), y = b.j.get<double>();
          if (op == "<") return Value{x < y};
          if (op == ">") return Value{x > y};
          if (op == "<=") return Value{x <= y};
          if (op == ">=") return Value{x >= y};
          if (ints && op != "/") {
            const int64_t p = a.j.get<int64_t>(), q = b.j.get<int64_t>();
            if (op == "+") return Value{p + q};
            if (op == "-") return Value{p - q};
            if (op == "*") return Value{p * q};
            if (q == 0) Fail("division by zero");
            if (op == "//") return Value{p / q};
            if (op == "%") return Value{((p % q) + q) % q};
          }
          if (op == "+") return Value{x + y};
          if (op == "-") return Value{x - y};
          if (op == "*") return Value{x * y};
          if (op == "/") return Value{x / y};
        }
        if (a.j.is_string() && b.j.is_string() && (op == "<" || op == ">" || op == "<=" || op == ">=")) {
          const int c = a.j.get<std::string>().compare(b.j.get<std::string>());
          return Value{op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0};
        }
        Fail("operator '" + op + "' does not apply to " + std::string(a.j.type_name()) + " and " + b.j.type_name());
      }
      case Expr::kTernary:
        return Truthy(Eval(*e.args[0])) ? Eval(*e.args[1]) : Eval(*e.args[2]);
    }
    Fail("bad expression");
  }

  std::vector<json> scopes_;
};

}  // namespace

struct ChatTemplate::Program {
  Body body;
};

StatusOr<ChatTemplate> ChatTemplate::FromSource(const std::string& source, std::string bos_token,
                                                std::string eos_token) {
  try {
    std::vector<Tag> tags = Split(source);
    size_t pos = 0;
    std::string stop, rest;
    auto program = std::make_shared<Program>();
    program->body = ParseBody(tags, pos, {}, &stop, &rest);
    ChatTemplate t;
    t.program_ = std::move(program);
    t.bos_token_ = std::move(bos_token);
    t.eos_token_ = std::move(eos_token);
    return t;
  } catch (const TemplateError& e) {
    return InvalidArgument("chat template: " + e.message);
  }
}

StatusOr<ChatTemplate> ChatTemplate::FromModelDir(const std::string& dir) {
  const std::string path = dir + "/tokenizer_config.json";
  std::ifstream in(path);
  if (!in) return ChatTemplate();
  json cfg = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (cfg.is_discarded() || !cfg.is_object()) return InvalidArgument(path + " is not a JSON object");
  auto token = [&](const char* key) -> std::string {
    auto it = cfg.find(key);
    if (it == cfg.end()) return "";
    if (it->is_string()) return it->get<std::string>();
    if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
      return (*it)["content"].get<std::string>();
    return "";
  };
  auto it = cfg.find("chat_template");
  if (it == cfg.end() || it->is_null()) return ChatTemplate();
  std::string source;
  if (it->is_string()) {
    source = it->get<std::string>();
  } else if (it->is_array()) {
    // Named templates: take "default".
    for (const json& t : *it)
      if (t.is_object() && t.contains("name") && t["name"] == "default" && t.contains("template") &&
          t["template"].is_string())
        source = t["template"].get<std::string>();
    if (source.empty()) return Unimplemented(path + ": chat_template list without a 'default' entry");
  } else {
    return InvalidArgument(path + ": chat_template must be a string");
  }
  StatusOr<ChatTemplate> t = FromSource(source, token("bos_token"), token("eos_token"));
  if (!t.ok()) return Status(t.status()).Prepend(path + ": ");
  return t;
}

StatusOr<std::string> ChatTemplate::Apply(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  if (!program_) {
    std::string out;
    for (const ChatMessage& m : messages) out += m.role + ": " + m.content + "\n";
    if (add_generation_prompt) out += "assistant:";
    return out;
  }
  json msgs = json::array();
  for (const ChatMessage& m : messages) msgs.push_back({{"role", m.role}, {"content", m.content}});
  json globals = {{"messages", msgs},
                  {"add_generation_prompt", add_generation_prompt},
                  {"bos_token", bos_token_},
                  {"eos_token", eos_token_}};
  try {
    Renderer r(std::move(globals));
    std::string out;
    r.Run(program_->body, &out);
    return out;
  } catch (const TemplateError& e) {
    return InvalidArgument(e.message);
  } catch (const json::exception& e) {
    return InvalidArgument(std::string("template evaluation: ") + e.what());
  }
}

}  // namespace ef::launch
