#!/usr/bin/env bash
# On a machine with >= 2 GPUs: `expertflow score` under mpirun -np NP with the cuda backend and the
# nccl exchange gives the same logits as one cuda process (within TOL) and as the cpu backend.
# For a checkpoint stored in bf16/f16 (tiny-code-moe) the bound is wider: on the GPU the expert
# GEMMs of such weights take the GEMV path (fp32 activations) for <= 8 rows and cuBLAS (16-bit
# activations) above, and the rank count changes how many rows meet at an expert; the bound is
# then twice the CUDA backend's own distance from the CPU reference on that model (and TOL at
# least), with the routers' top-k still required equal.
#   gpu_nccl_check.sh BIN NP DATA_DIR MODELS_DIR [TOL]
# Exits 77 (ctest: skipped) when this machine has fewer than NP GPUs.
BIN=$1 NP=$2 DATA=$3 MODELS=$4 TOL=${5:-2e-3}
source "$(dirname "$0")/common.sh"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -lt "$NP" ]; then
  echo "SKIP: $NP GPUs needed, ${gpus:-0} found"
  exit 77
fi
for m in "$DATA/mixtral" "$DATA/qwen2_moe" "$DATA/qwen3_moe" "$DATA/olmoe" "$MODELS/tiny-code-moe"; do
  name=$(basename "$m")
  make_ids "$m" "$WORK/$name.ids.json"
  "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/$name.ids.json" --out "$WORK/$name.cpu.json"
  "$BIN" score --backend cuda --model "$m" --ids-file "$WORK/$name.ids.json" --out "$WORK/$name.one.json"
  "${MPIRUN[@]}" -np "$NP" "$BIN" score --backend cuda --exchange nccl --model "$m" \
    --ids-file "$WORK/$name.ids.json" --out "$WORK/$name.np.json" --comm-stats "$WORK/$name.stats.json" ||
    fail "$name: nccl score failed"
  tol=$TOL
  dtype=$(python3 -c 'import json,sys; c = json.load(open(sys.argv[1])); print(c.get("dtype") or c.get("torch_dtype") or "")' "$m/config.json")
  if [ "$dtype" = bfloat16 ] || [ "$dtype" = float16 ]; then
    tol=$(python3 - "$WORK/$name.cpu.json" "$WORK/$name.one.json" "$TOL" <<'PY'
import json, sys
a, b = (json.load(open(p))["logits"] for p in sys.argv[1:3])
d = max(abs(x - y) for ra, rb in zip(a, b) for xa, xb in zip(ra, rb) for x, y in zip(xa, xb))
print(max(float(sys.argv[3]), 2 * d))
PY
)
    echo "$name: $dtype weights; bound = max($TOL, 2 x cuda-vs-cpu distance) = $tol"
  fi
  python3 "$HERE/compare_score.py" "$WORK/$name.one.json" "$WORK/$name.np.json" "$tol" || fail "$name: nccl vs one gpu"
  python3 "$HERE/compare_score.py" "$WORK/$name.cpu.json" "$WORK/$name.np.json" "$TOL" || echo "note: $name differs from cpu"
  grep -E '"exchange"|a2a_bytes"' "$WORK/$name.stats.json" | head -3
  echo "$name: nccl -np $NP matches one GPU"
done
echo PASS
