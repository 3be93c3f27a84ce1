#!/usr/bin/env bash
# HTTP load test of `expertflow serve` on loopback (a benchmark, not a ctest).
#
#   scripts/bench/load_test.sh [BUILD_DIR] [OUT_DIR]
#   REQUESTS=500 CONCURRENCY=200 MAX_TOKENS=16 scripts/bench/load_test.sh
#
# Starts `expertflow serve --model models/tiny-code-moe --port 0` on 127.0.0.1, computes the
# expected greedy text of each prompt with `expertflow generate` (chat prompts rendered as the
# server's plain chat template does: "user: <content>\nassistant:"), then runs
# scripts/bench/load_test.py: REQUESTS requests, CONCURRENCY at a time, mixed completions/chat
# and streaming/non-streaming, temperature 0. Writes OUT_DIR/load_test.json and prints the table.
# Exits non-zero on any lost or failed request or any output that differs from `generate`.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
out=${2:-bench-results}
model=${MODEL:-models/tiny-code-moe}
requests=${REQUESTS:-500}
concurrency=${CONCURRENCY:-200}
max_tokens=${MAX_TOKENS:-16}
bin="$build/expertflow"
[ -x "$bin" ] || { echo "load_test.sh: $bin not built (ninja -C $build expertflow)" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

prompts=(
  'def fib(n):'
  'import numpy as np'
  'class Stack:'
  'for i in range(10):'
  '#include <stdio.h>'
  'function add(a, b) {'
  'SELECT name FROM users WHERE'
  'public static void main(String[] args) {'
  'fn main() {'
  'def quicksort(arr):'
)

# Expected texts: what `generate` prints after the prompt, without its final newline.
generate_text() {
  local prompt=$1 full
  full=$("$bin" generate --model "$model" --backend cpu --prompt "$prompt" --max-new-tokens "$max_tokens" \
    --temperature 0 2>/dev/null; printf x)
  full=${full%x}
  full=${full%$'\n'}
  printf '%s' "${full#"$prompt"}"
}
for i in "${!prompts[@]}"; do
  p=${prompts[$i]}
  generate_text "$p" >"$work/completion.$i"
  generate_text "user: $p"$'\n'"assistant:" >"$work/chat.$i"
  printf "%s" "$p" >"$work/prompts.$i"
done
python3 - "$work" "${#prompts[@]}" >"$work/expected.json" <<'EOF'
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
read = lambda name: open(f"{work}/{name}", encoding="utf-8").read()
print(json.dumps({k: [read(f"{k}.{i}") for i in range(n)] for k in ("prompts", "completion", "chat")}))
EOF
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("expected:", json.dumps(d["completion"][0]))' \
  "$work/expected.json"

"$bin" serve --model "$model" --backend cpu --host 127.0.0.1 --port 0 --max-queue "$((requests * 2))" \
  >"$work/serve.out" 2>"$work/serve.err" &
server_pid=$!
port=""
for _ in $(seq 1 300); do
  port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/serve.out" | head -1)
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.err" >&2; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "load_test.sh: the server printed no port" >&2; exit 1; }
model_name=$(curl -s "http://127.0.0.1:$port/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
echo "# load_test.sh: git $(git rev-parse --short=12 HEAD), $(grep -m1 CMAKE_BUILD_TYPE: "$build/CMakeCache.txt" | cut -d= -f2)" \
  "build, $(nproc) cores, server 127.0.0.1:$port, model $model_name"
status=0
python3 scripts/bench/load_test.py --port "$port" --model "$model_name" --expected "$work/expected.json" \
  --requests "$requests" --concurrency "$concurrency" --max-tokens "$max_tokens" --json "$out/load_test.json" ||
  status=$?
kill -0 "$server_pid" 2>/dev/null || { echo "load_test.sh: the server died" >&2; cat "$work/serve.err" >&2; status=1; }
exit "$status"
