#!/bin/bash
# On the accelerator machine (one GPU): the GPU tests, the host expert kernel, then offloaded
# decode of a Mixtral-8x7B-shaped checkpoint (LAYERS layers, random bf16 weights, the first LAYERS
# layers of the real Mixtral routing trace) with LRU on demand, for each load precision, with and
# without cache.cpu_compute (missed experts computed on the host CPU), side by side.
#
#   scripts/accel/cpu-compute-run.sh [LAYERS] [GEN]      (default 4 layers, 32 tokens; CASES overrides
#                                                        the budget:concurrency:precision:cpu list)
# Past 16 layers (or with IN_MEMORY=1) the checkpoint is generated in host memory instead of on
# disk (--synthetic-in-memory, DISTINCT=2 distinct layers): 32 layers are 93 GB.
# Needs .deps/debs carried (bash ../shared/tools/accel-deps.sh .deps/debs here first).
set -uo pipefail
LAYERS=${1:-4}
GEN=${2:-32}
EF_BUILD_TESTS=ON source "$(dirname "$0")/build-full.sh" gpu_tests ef_host_expert_bench ef_quant_bench || exit 1
R=$OUT/cpu_compute
mkdir -p "$R"
if [[ -n ${TEST_FILTER:-} ]]; then
  # Only the GPU tests matching TEST_FILTER (a gtest filter).
  t0=$(date +%s)
  timeout 300 "$BUILD"/tests/gpu_tests --gtest_filter="$TEST_FILTER" 2>&1 |
    grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|Expected|actual|Which is|cpu compute \]" | head -60
  echo "gpu tests ($TEST_FILTER) in $(($(date +%s) - t0)) s"
elif [[ -z ${SKIP_TESTS:-} ]]; then
  t0=$(date +%s)
  (cd "$BUILD" && timeout 300 ctest -L gpu --timeout 240 --output-on-failure 2>&1 |
    grep -vE "^ *[0-9]+/[0-9]+ Test.*Passed|^ *Start " | grep -E "Expected|actual|Which is|FAILED|tests passed|Skipped|Failed|error|cpu compute \]" | head -40)
  echo "gpu tests in $(($(date +%s) - t0)) s"
  "$BUILD"/tests/gpu_tests --gtest_filter='*CpuCompute*' 2>&1 | grep -F "[ cpu compute ]"
fi
# HOST_BENCH=none skips the host kernel's benchmarks (the offload cases alone).
if [[ ${HOST_BENCH:-full} != none ]]; then
# One Mixtral expert's three matrices, eight copies in turn (weights from memory, as a miss's, not
# from the last-level cache), 1 and 4 rows. What differs between the benchmark and a run: the host tier's memory (cudaHostAlloc's 4 KiB pages,
# or EF_PINNED_HUGE_PAGES' 2 MiB ones, against ordinary memory), the idle time between a decode
# step's host computations (threads asleep, cores idle), and the copy engine reading host memory
# at the same time (below).
grep -E "AnonHugePages|HugePages_Total" /proc/meminfo
HB=("$BUILD"/tests/ef_host_expert_bench 4096 14336 10 8 --rows=1,4 --no-exact)
for mem in vector pinned huge; do "${HB[@]}" --memory=$mem; done
for mem in pinned huge; do "${HB[@]}" --memory=$mem --gap-ms=3; done
# After an idle gap, with the workers bound to CPUs, and with them polling through the gap.
EF_THREAD_POOL_PIN=1 "${HB[@]}" --memory=pinned --gap-ms=3
EF_THREAD_POOL_SPIN_US=5000 "${HB[@]}" --memory=pinned --gap-ms=3
# The same while pinned host memory streams to the GPU at full PCIe rate, as the cache's copies do
# in a run: does the DMA's share of host memory bandwidth slow the host's expert? (The copying
# thread waits on a blocking event, so that it does not spin on a core the host's threads use.)
python3 - "${HB[@]}" --memory=pinned <<'PY' 2>&1 | grep -vi warn
import subprocess, sys, threading, time
import torch
src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
stop, moved = threading.Event(), [0]
done = torch.cuda.Event(blocking=True)
def copy():
    while not stop.is_set():
        dst.copy_(src, non_blocking=True)
        done.record()
        done.synchronize()
        moved[0] += 1
t = threading.Thread(target=copy)
t0 = time.time()
t.start()
time.sleep(1)
print("# under a host-to-device copy load:")
subprocess.run(sys.argv[1:])
stop.set()
t.join()
print("# copy load: %.1f GB/s over the bench" % (moved[0] * (1 << 30) / 1e9 / (time.time() - t0)))
PY
fi
lscpu | grep -E "^(Model name|NUMA node|L3 cache|Thread)" ; numactl -H 2>/dev/null | head -3
"$BUILD"/tests/ef_quant_bench 14336 4096 5 "$(nproc)"  # the quantizer the host tier's int8/int4 load runs

TRACE=tests/data/traces/mixtral8x7b_gsm8k_decode.jsonl
SLICED=$PWD/.deps/mixtral_first${LAYERS}.jsonl
python3 scripts/bench/slice_trace.py "$TRACE" "$SLICED" "$LAYERS" >/dev/null || exit 1
SYN=$PWD/.deps/synthetic
BIN=$BUILD/expertflow
SYNFLAGS=(--synthetic-dir "$SYN")
if [[ ${IN_MEMORY:-0} == 1 || $LAYERS -gt 16 ]]; then
  SYNFLAGS+=(--synthetic-in-memory --synthetic-distinct-layers "${DISTINCT:-2}")
else  # written once, before the timed runs
  $BIN bench --backend cuda --synthetic mixtral-8x7b --synthetic-layers "$LAYERS" "${SYNFLAGS[@]}" \
    -n 1 -c 1 --prompt-len 4 --gen-len 2 >"$R/warm.log" 2>&1 || { tail -20 "$R/warm.log"; exit 1; }
fi

printf "%-7s %-5s %-9s %-14s %10s %9s %9s %11s %9s %8s %8s %s\n" budget conc precision cpu "out_tok/s" itl_ms ttft_ms \
  "moved_MiB" hit_rate stall_ms host_ms "host experts/token (split, copied share)" | tee "$R/offload.txt"
# budget:concurrency:precision:cpu_compute[:modifiers], run in this order (baselines first in each
# group). Modifiers, comma-separated: w0 (no cache warm-up), lfu (--cache-policy lfu instead of
# lru), tN (EF_NUM_THREADS=N: the host's threads), rN (cache.cpu_compute_max_rows N: misses of up
# to N rows may go to the host; the default 4), f32x (EF_HOST_GEMV_INT8_X=none: int4 weights with
# x in fp32, the kernel before W4A8), noamx (EF_HOST_GEMV_AMX=0: bf16 on AVX-512 FMAs), mem (the
# budget in bytes: budget% of the bf16 experts' bytes, so int8/int4 slots hold more experts in the
# same memory; staging for split misses comes out of it), pN (EF_HOST_GEMV_PIECES=N: pieces per
# thread of the host's matrices; 1 is one fixed share per thread), huge (EF_PINNED_HUGE_PAGES=1: the
# host tier on 2 MiB pages), sN (EF_THREAD_POOL_SPIN_US=N: the host's threads poll N us for work
# before they sleep; the default 50), pin (EF_THREAD_POOL_PIN=1: each of the host's worker threads
# bound to a CPU of its own), aN (--cpu-experts-admit N: a miss with at least N more uses than the
# least used resident expert of its layer is loaded into that expert's slot; a0 turns it off;
# scripts/bench/host_admission_sim.py), dflt (the cache's defaults for what the case does not name:
# no --cache-policy, --prefetch-layers or --predictor, so policy expertflow with prefetch from the
# frequency forecast; cpu "default" then also leaves --cpu-experts to its default), lN
# (--low-precision-layers "last N%": int8/int4 loads in the last N% of the MoE layers only, the
# others bf16; each layer's slots are its experts' size, so with mem the int8 layers hold about
# twice as many), hl (--high-precision lossless: the loads left in bf16, e.g. the layers outside lN,
# packed losslessly).
# host_ms: the host's mean time per expert inside the run, scaled to a whole expert (a split
# expert's host part is a share of one).
# The default list: the LRU baselines, then the configurations whose quality meets a bar
# (docs/results/cpu_compute/README.md, "Speed and quality together"): bf16 with host compute, int8
# in the last half of the layers (the int8 bar) alone and with host compute, int8 slots in a byte
# budget (the auto bar); then int4 (below every bar) with and without the host's rows in pieces.
# (miss_precision auto runs on the cpu backend only.)
CASES=${CASES:-"50:1:native:off 50:1:native:auto 50:1:int8:off:l50,mem 50:1:int8:auto:l50,mem 50:1:int8:off:mem
  50:1:int8:auto:mem 25:1:native:off 25:1:int8:auto:l50,mem 25:1:int8:auto:mem 50:1:int4:auto 50:1:int4:auto:p1"}
for case in $CASES; do
  IFS=: read -r b c p cpu mods <<<"$case"
  slots=$((8 * b / 100))
  tag=b${b}_c${c}_${p}_${cpu}${mods:+_${mods//,/_}}
  extra=() envs=() policy_args=(--cache-policy lru --prefetch-layers 0)
  budget_arg="$slots slots per layer"
  for m in ${mods//,/ }; do
    case $m in
      w0) extra+=(--warmup-tokens 0) ;;
      t[0-9]*) envs+=(EF_NUM_THREADS=${m#t}) ;;
      p[0-9]*) envs+=(EF_HOST_GEMV_PIECES=${m#p}) ;;
      lfu) policy_args=(--cache-policy lfu --prefetch-layers 0) ;;
      dflt) policy_args=() ;;
      r[0-9]*) extra+=(--cpu-experts-max-rows "${m#r}") ;;
      f32x) envs+=(EF_HOST_GEMV_INT8_X=none) ;;
      noamx) envs+=(EF_HOST_GEMV_AMX=0) ;;
      huge) envs+=(EF_PINNED_HUGE_PAGES=1) ;;
      pin) envs+=(EF_THREAD_POOL_PIN=1) ;;
      s[0-9]*) envs+=(EF_THREAD_POOL_SPIN_US=${m#s}) ;;
      a[0-9]*) extra+=(--cpu-experts-admit "${m#a}") ;;
      l[0-9]*) extra+=(--low-precision-layers "last ${m#l}%") ;;
      hl) extra+=(--high-precision lossless) ;;
      mem) budget_arg=$((LAYERS * 8 * 3 * 4096 * 14336 * 2 * b / 100)) ;;  # bytes of b% of the bf16 experts
    esac
  done
  j=$R/$tag.json
  log=$R/$tag.log
  env "${envs[@]}" timeout 240 $BIN bench --backend cuda --synthetic mixtral-8x7b --synthetic-layers "$LAYERS" "${SYNFLAGS[@]}" \
    --routing-trace "$SLICED" -n $((2 * c)) -c "$c" --prompt-len 16 --gen-len "$GEN" \
    --cache-device-budget "$budget_arg" "${policy_args[@]}" --miss-precision "$p" \
    --cpu-experts "$cpu" "${extra[@]}" --json "$j" >"$log" 2>&1 || { tail -5 "$log"; continue; }
  python3 - "$j" "$b" "$c" "$p" "$cpu${mods:+/$mods}" <<'PY' | tee -a "$R/offload.txt"
import json, sys
j = json.load(open(sys.argv[1]))
r, c = j["results"], j["cache"]
n = max(1, r["generated_tokens"])
per_tok = c.get("cpu_computed_experts", 0) / n
split = c.get("split_experts", 0) / n
done = c.get("cpu_computed_experts", 0)
# A split expert's host part is (1 - copied share) of a whole one.
whole = done - c.get("split_experts", 0) * c.get("split_copied_fraction", 0)
host_ms = c.get("cpu_compute_ms", 0) / whole if whole > 0 else 0
print(f"{sys.argv[2] + '%':<7} {sys.argv[3]:<5} {sys.argv[4]:<9} {sys.argv[5]:<14} {r['output_tokens_per_s']:10.2f} "
      f"{r['itl_ms_p50']:9.2f} {r['ttft_ms_p50']:9.1f} {r['bytes_moved'] / 2**20:11.1f} {r['hit_rate']:9.3f} "
      f"{c['stall_ms']:8.1f} {host_ms:8.2f} {per_tok:.2f} ({split:.2f}, {c.get('split_copied_fraction', 0):.2f})"
      + (f" admitted {c['cpu_compute_admitted']}" if c.get('cpu_compute_admitted') else ""))
PY
  tr '\r' '\n' <"$log" | grep -E "(pinning|allocating pinned).* GB in " | sed 's/^.*\] */    load: /'
done
grep -h "cpu compute of missed experts" "$R"/*.log | sed 's/^.*cpu compute/cpu compute/' | sort | uniq -c | head -8
# The logs and JSON as one archive under $OUT.
(cd "$OUT" && tar czf cpu_compute.tgz cpu_compute && rm -rf cpu_compute)
