#!/usr/bin/env bash
# On a machine with >= 2 GPUs: `expertflow score` under mpirun -np NP with the cuda backend and the
# nccl exchange gives the same logits as one cuda process (within TOL) and as the cpu backend.
#   gpu_nccl_check.sh BIN NP DATA_DIR MODELS_DIR [TOL]
BIN=$1 NP=$2 DATA=$3 MODELS=$4 TOL=${5:-2e-3}
source "$(dirname "$0")/common.sh"
for m in "$DATA/mixtral" "$DATA/qwen2_moe" "$DATA/qwen3_moe" "$DATA/olmoe" "$MODELS/tiny-code-moe"; do
  name=$(basename "$m")
  make_ids "$m" "$WORK/$name.ids.json"
  "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/$name.ids.json" --out "$WORK/$name.cpu.json"
  "$BIN" score --backend cuda --model "$m" --ids-file "$WORK/$name.ids.json" --out "$WORK/$name.one.json"
  "${MPIRUN[@]}" -np "$NP" "$BIN" score --backend cuda --exchange nccl --model "$m" \
    --ids-file "$WORK/$name.ids.json" --out "$WORK/$name.np.json" --comm-stats "$WORK/$name.stats.json" ||
    fail "$name: nccl score failed"
  python3 "$HERE/compare_score.py" "$WORK/$name.one.json" "$WORK/$name.np.json" "$TOL" || fail "$name: nccl vs one gpu"
  python3 "$HERE/compare_score.py" "$WORK/$name.cpu.json" "$WORK/$name.np.json" "$TOL" || echo "note: $name differs from cpu"
  grep -E '"exchange"|a2a_bytes"' "$WORK/$name.stats.json" | head -3
  echo "$name: nccl -np $NP matches one GPU"
done
echo PASS
