#!/bin/bash
# On a machine with >= 2 GPUs: build `expertflow` and `ef_a2a_bench` (CUDA, MPI/UCX comm) in
# build-gpu2, then with NP ranks:
#   - ef_a2a_bench: NcclExchange dispatch+combine vs raw NCCL all-to-all ($OUT/a2a_bench.{txt,json});
#   - the expert-parallel NCCL check (tests/comm/gpu_nccl_check.sh) against one GPU;
#   - a stalled rank under the nccl exchange: the others must exit naming it within 30 s;
#   - the cuda backend with the mpi exchange (rows staged through host memory) on the mixtral fixture;
#   - if all of that passed, the same comparison on tiny-code-moe with EF_CUDA_BF16_WEIGHTS=1.
# Each step has its own timeout so one slow step leaves the others' results.
#
# Needs the Debian packages of setup-and-build.sh in .deps/debs (carry them; build-full.sh).
#
#   scripts/accel/nccl-check.sh [NP]        logs under $OUT (or ./out)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
NP=${1:-2}

# (1)-(4) Unpack the carried packages, build expertflow and ef_a2a_bench, runtime environment.
EF_BUILD_TESTS=ON source "$(dirname "$0")/build-full.sh" ef_a2a_bench || exit 1
ldd build-gpu2/expertflow | grep -E "uc[mpst]|httplib|nccl|mpi|not found" | tee -a "$OUT/env.txt"

# (5) Exchange vs raw NCCL all-to-all, Mixtral shapes, 16/64/256 tokens per rank.
t0=$(date +%s)
timeout 120 mpirun -np "$NP" -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH --oversubscribe --bind-to none \
  build-gpu2/tests/ef_a2a_bench --json "$OUT/a2a_bench.json" 2>&1 | tee "$OUT/a2a_bench.txt"
echo "a2a bench rc=${PIPESTATUS[0]} in $(($(date +%s) - t0)) s"

# (6) NCCL -np NP vs one GPU on every fixture, fp32 weights.
t0=$(date +%s)
timeout 240 bash tests/comm/gpu_nccl_check.sh build-gpu2/expertflow "$NP" tests/data models 2>&1 |
  tee "$OUT/nccl_check.log"
rc=${PIPESTATUS[0]}
echo "nccl check rc=$rc in $(($(date +%s) - t0)) s" | tee -a "$OUT/nccl_check.log"

# (7) The cuda backend with the host (mpi) exchange, rows staged through host memory: the mixtral
# fixture under -np NP vs one GPU.
t0=$(date +%s)
(
  BIN=build-gpu2/expertflow
  source tests/comm/common.sh
  m=tests/data/mixtral
  make_ids "$m" "$WORK/ids.json"
  "$BIN" score --backend cuda --model "$m" --ids-file "$WORK/ids.json" --out "$WORK/one.json"
  timeout 60 "${MPIRUN[@]}" -np "$NP" "$BIN" score --backend cuda --exchange mpi --model "$m" \
    --ids-file "$WORK/ids.json" --out "$WORK/np.json" || fail "mixtral: cuda + mpi exchange score failed"
  python3 "$HERE/compare_score.py" "$WORK/one.json" "$WORK/np.json" 2e-3 || fail "mixtral: cuda + mpi vs one gpu"
  echo "mixtral: cuda backend + mpi exchange -np $NP matches one GPU"
) 2>&1 | tee "$OUT/cuda_mpi.log"
[[ ${PIPESTATUS[0]} == 0 ]] || rc=1
echo "cuda + mpi exchange check in $(($(date +%s) - t0)) s"

# (8) The last rank stalls at layer 1 under the nccl exchange: the others must give up after
# cluster.timeout_s (3 s), name it, and exit (the communicators aborted, not waited on).
t0=$(date +%s)
stall_rc=0
last=$((NP - 1))
timeout 60 mpirun -np "$NP" -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH -x EF_DEBUG_FAULT_RANK=$last \
  -x EF_DEBUG_STALL_AT_LAYER=1 --oversubscribe --bind-to none build-gpu2/expertflow generate --backend cuda \
  --exchange nccl --model models/tiny-code-moe -n 4 --timeout 3 >"$OUT/nccl_stall.log" 2>&1 || stall_rc=$?
took=$(($(date +%s) - t0))
if [[ $stall_rc != 0 && $stall_rc != 124 && $took -le 30 ]] &&
  grep -Eq "rank $last did not complete .* within 3 s" "$OUT/nccl_stall.log"; then
  echo "nccl stall: exit $stall_rc after $took s: $(grep -Em1 "rank $last did not complete" "$OUT/nccl_stall.log")"
else
  echo "nccl stall: FAIL (exit $stall_rc after $took s)"
  tail -20 "$OUT/nccl_stall.log"
  rc=1
fi

# (9) If everything above passed: bf16 weights on tiny-code-moe, one GPU vs NCCL -np NP (the same
# bf16 weights on both sides). tiny-code-moe's checkpoint is already bf16, so the knob changes
# nothing there and (6) already shows a ~0.1 difference on it (the CUDA backend's GEMM path
# depends on the row count: GEMV with fp32 activations for <= 2 rows, cuBLAS with bf16-rounded
# activations above, and a rank's expert row counts differ from one process's); run by hand, this
# step reports the same difference.
bf_rc=skipped
if [[ $rc == 0 ]]; then
  t0=$(date +%s)
  (
    BIN=build-gpu2/expertflow
    source tests/comm/common.sh
    export EF_CUDA_BF16_WEIGHTS=1
    m=models/tiny-code-moe
    make_ids "$m" "$WORK/ids.json"
    "$BIN" score --backend cuda --model "$m" --ids-file "$WORK/ids.json" --out "$WORK/one.json"
    "${MPIRUN[@]}" -x EF_CUDA_BF16_WEIGHTS -x NCCL_NVLS_ENABLE -np "$NP" "$BIN" score --backend cuda \
      --exchange nccl --model "$m" --ids-file "$WORK/ids.json" --out "$WORK/np.json" \
      --comm-stats "$WORK/stats.json" || fail "tiny-code-moe bf16: nccl score failed"
    python3 "$HERE/compare_score.py" "$WORK/one.json" "$WORK/np.json" 2e-2 ||
      fail "tiny-code-moe bf16: nccl vs one gpu"
    grep -E '"exchange"|a2a_bytes"' "$WORK/stats.json" | head -3
    echo "tiny-code-moe bf16: nccl -np $NP matches one GPU (tol 2e-2)"
    echo PASS
  ) 2>&1 | tee "$OUT/nccl_bf16.log"
  bf_rc=${PIPESTATUS[0]}
  echo "bf16 check rc=$bf_rc in $(($(date +%s) - t0)) s" | tee -a "$OUT/nccl_bf16.log"
fi
echo "fp32/mpi/stall rc=$rc bf16 rc=$bf_rc"
exit "$rc"
