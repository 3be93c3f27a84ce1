#include "runtime/core/gptq.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/core/quant.h"
#include "runtime/core/quant_format.h"
#include "runtime/core/thread_pool.h"

namespace ef {
namespace {

// In place: the lower Cholesky factor L of the symmetric positive definite a [n, n] (a = L L^T),
// row by row (Cholesky-Banachiewicz: each entry is one contiguous dot product). The upper triangle
// is zeroed. False when a pivot is not positive.
bool CholeskyLower(std::vector<double>& a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    double* ri = a.data() + i * n;
    for (int64_t j = 0; j <= i; ++j) {
      const double* rj = a.data() + j * n;
      double s = ri[j];
      for (int64_t k = 0; k < j; ++k) s -= ri[k] * rj[k];
      if (j < i) {
        ri[j] = s / rj[j];
      } else {
        if (!(s > 0)) return false;
        ri[i] = std::sqrt(s);
      }
    }
    std::fill(ri + i + 1, ri + n, 0.0);
  }
  return true;
}

// U upper with H^-1 = U^T U (row-major [n, n]), from H's lower factor L (H = L L^T): M = L^-1 by
// forward substitution, H^-1 = M^T M, and U the transpose of that product's lower factor.
bool InverseUpperFactor(const std::vector<double>& l, int64_t n, std::vector<double>& u) {
  // M = L^-1 (lower), column by column by forward substitution, stored row-major.
  std::vector<double> m(static_cast<size_t>(n * n), 0.0);
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t i = c; i < n; ++i) {
      double s = i == c ? 1.0 : 0.0;
      const double* li = l.data() + i * n;
      for (int64_t k = c; k < i; ++k) s -= li[k] * m[k * n + c];
      m[i * n + c] = s / li[i];
    }
  }
  // G = M^T M (symmetric): G[i][j] = sum_{k >= max(i, j)} M[k][i] M[k][j]; accumulated row of M by
  // row of M so the inner loop is contiguous.
  std::vector<double> g(static_cast<size_t>(n * n), 0.0);
  for (int64_t k = 0; k < n; ++k) {
    const double* mk = m.data() + k * n;
    for (int64_t i = 0; i <= k; ++i) {
      const double v = mk[i];
      if (v == 0.0) continue;
      double* gi = g.data() + i * n;
      for (int64_t j = 0; j <= i; ++j) gi[j] += v * mk[j];
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) g[j * n + i] = g[i * n + j];
  if (!CholeskyLower(g, n)) return false;
  u.assign(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) u[j * n + i] = g[i * n + j];
  return true;
}

float ParamAt(const std::byte* p, int64_t i) {
  uint16_t h;
  std::memcpy(&h, p + i * 2, 2);
  return F16ToF32(h);
}

}  // namespace

StatusOr<size_t> QuantizeGptq(DType target, const float* w, int64_t rows, int64_t cols, const double* hessian,
                              void* dst, size_t dst_bytes, const GptqOptions& options) {
  if (target != DType::kQ8 && target != DType::kQ4)
    return InvalidArgument(std::string("GPTQ quantizes to Q8 or Q4, not ") + DTypeName(target));
  const QuantFormat& f = QuantFormat::Of(target);
  if (rows <= 0 || cols <= 0 || !f.divides(cols))
    return InvalidArgument("GPTQ: a [" + std::to_string(rows) + ", " + std::to_string(cols) +
                           "] weight, whose width is not a multiple of the group of " + std::to_string(f.group));
  const size_t need = f.bytes(rows, cols);
  if (dst_bytes < need)
    return InvalidArgument("GPTQ: " + std::to_string(dst_bytes) + " bytes for a block of " + std::to_string(need));
  if (!(options.damp >= 0) || !std::isfinite(options.damp))
    return InvalidArgument("GPTQ: damping must be a finite number >= 0");
  const int64_t n = cols;
  std::vector<double> h(hessian, hessian + n * n);
  double mean_diag = 0;
  for (int64_t i = 0; i < n * n; ++i)
    if (!std::isfinite(h[i])) return InvalidArgument("GPTQ: the Hessian holds a value that is not finite");
  for (int64_t i = 0; i < n; ++i) {
    if (h[i * n + i] < 0)
      return InvalidArgument("GPTQ: the Hessian's diagonal entry " + std::to_string(i) + " is negative");
    mean_diag += h[i * n + i];
  }
  mean_diag /= static_cast<double>(n);
  // A dead input: its row and column are zero (every x_t has a 0 there); 1 on the diagonal leaves
  // its column to round to nearest without touching the others.
  for (int64_t i = 0; i < n; ++i) {
    if (h[i * n + i] == 0) {
      h[i * n + i] = 1;
    } else {
      h[i * n + i] += options.damp * mean_diag;
    }
  }
  // Columns in order of decreasing input energy (GPTQ's act order): the error of the columns that
  // matter most is spread over the most columns still to come.
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  if (options.act_order)
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return h[a * n + a] > h[b * n + b]; });
  std::vector<double> hp(static_cast<size_t>(n * n));
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b) hp[a * n + b] = h[order[a] * n + order[b]];
  std::vector<double> u;
  if (!CholeskyLower(hp, n) || !InverseUpperFactor(hp, n, u))
    return FailedPrecondition("GPTQ: the Hessian is not positive definite (raise the damping)");

  // Every group's parameters are Quantize's, from the weights as given (static groups: the order
  // of the columns does not change them); Quantize also checks the values.
  std::byte* out = static_cast<std::byte*>(dst);
  EF_ASSIGN_OR_RETURN(size_t written, Quantize(target, DType::kF32, w, rows, cols, out, dst_bytes));
  const int64_t groups = cols / f.group;
  const std::byte* params = out + f.params_offset(rows, cols);
  std::memset(out, 0, static_cast<size_t>(rows * f.row_value_bytes(cols)));
  const float qmax = static_cast<float>(f.qmax());
  ThreadPool::Default().ParallelFor(rows, [&](int64_t begin, int64_t end) {
    std::vector<double> row(static_cast<size_t>(n));  // in column order `order`
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t a = 0; a < n; ++a) row[a] = w[r * n + order[a]];
      std::byte* vals = out + r * f.row_value_bytes(cols);
      const int64_t p0 = r * groups * f.params_per_group();
      for (int64_t a = 0; a < n; ++a) {
        const int64_t j = order[a], g = j / f.group;
        const float s = ParamAt(params, p0 + g * f.params_per_group());
        const float inv = s > 0 ? 1.0f / s : 0.0f;
        const float v = static_cast<float>(row[a]);
        float deq;
        if (f.asymmetric) {
          const float mn = ParamAt(params, p0 + g * f.params_per_group() + 1);
          const float q = std::nearbyint(std::clamp((v - mn) * inv, 0.0f, qmax));
          const auto qi = static_cast<unsigned>(q);
          vals[j / 2] = static_cast<std::byte>(static_cast<unsigned>(vals[j / 2]) | (j % 2 ? qi << 4 : qi));
          const float qs = q * s;  // no fused multiply-add, as the kernels
          deq = qs + mn;
        } else {
          const float q = std::nearbyint(std::clamp(v * inv, -qmax, qmax));
          vals[j] = static_cast<std::byte>(static_cast<int8_t>(q));
          deq = q * s;
        }
        // The rounding error, spread over the columns still to come.
        const double* ua = u.data() + a * n;
        const double e = (row[a] - static_cast<double>(deq)) / ua[a];
        for (int64_t b = a + 1; b < n; ++b) row[b] -= e * ua[b];
      }
    }
  });
  return written;
}

}  // namespace ef
