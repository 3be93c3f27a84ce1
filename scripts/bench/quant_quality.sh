#!/usr/bin/env bash
# What low-precision expert loads (cache.miss_precision) cost in quality: teacher-forced decode
# (`score --chunk 1`, one token a step through the KV cache, as generation meets the expert cache)
# of held-out Python (the sequences of tests/data/traces/tiny_code_moe_prefill.jsonl, recorded on
# files the model did not train on) with models/tiny-code-moe, against the same run with every
# expert resident in the checkpoint's precision: top-1 agreement of the next-token prediction and
# mean KL(reference || quantized) per token, for each precision and budget, plus the bytes loaded.
# Each comes with a 95% interval from resampling whole sequences (2,000 draws, fixed seed): the mean
# KL of a configuration is carried by a few tokens, and sequences differ several-fold.
#   scripts/bench/quant_quality.sh [BIN] [OUT_DIR]      (defaults: build/expertflow, docs/results/quant)
# SEQS: how many held-out sequences of 256 tokens (default 27, all of them: 6,912 tokens).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-build/expertflow}
OUT=${2:-docs/results/quant}
MODEL=models/tiny-code-moe
TRACE=tests/data/traces/tiny_code_moe_prefill.jsonl
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ef_quant_quality.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
SEQS=${SEQS:-27}
python3 - "$TRACE" "$WORK/ids.json" "$SEQS" <<'PY'
import json, sys, collections
seqs = collections.defaultdict(list)
with open(sys.argv[1]) as f:
    f.readline()
    for line in f:
        t = json.loads(line)
        seqs[t["seq"]].append((t["pos"], t["token"]))
ids = [[tok for _, tok in sorted(v)] for _, v in sorted(seqs.items()) if len(v) >= 256][:int(sys.argv[3])]
json.dump({"input_ids": [s[:256] for s in ids]}, open(sys.argv[2], "w"))
PY
# GPTQ experts (`expertflow quantize`), calibrated on the repository's own Python files: code like
# the held-out text, none of it; all of it calibrates (the quality below is the held-out measure),
# and every expert that saw 64 tokens is calibrated.
mapfile -t CALIB < <(git ls-files '*.py')
for p in int8 int4; do
  "$BIN" quantize --backend cpu --model "$MODEL" --precision "$p" --calibration "${CALIB[@]}" --hold-out-every 0 --min-tokens 64 \
    --out "$WORK/gptq_$p.safetensors" 2>&1 | grep -E "^calibration:|output error|^wrote" >&2
done
echo "# reference: every expert resident, $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >&2
"$BIN" score --backend cpu --model "$MODEL" --ids-file "$WORK/ids.json" --chunk 1 --out "$WORK/ref.json"
# name | cache flags (precision and its knobs) | environment of the run
# The "x in int8" rows multiply every low-precision expert with x rounded to int8 per group of 64
# (EF_CPU_INT8_X), as the host kernel of cache.cpu_compute does: an upper bound, since on a GPU
# only the experts the host computes see it.
configs=(
  "native|--miss-precision native"
  "int8|--miss-precision int8"
  "int8, GPTQ (expertflow quantize)|--miss-precision int8 --quantized-experts $WORK/gptq_int8.safetensors"
  "int4|--miss-precision int4"
  "int4, GPTQ (expertflow quantize)|--miss-precision int4 --quantized-experts $WORK/gptq_int4.safetensors"
  "auto (defaults: int8 below gate 0.5, upgrade after 16 uses)|--miss-precision auto"
  "auto, no upgrade|--miss-precision auto --upgrade-uses 0"
  "auto, every miss int8, upgrade after 16 uses|--miss-precision auto --low-precision-gate 1"
  "auto int4, gate 0.3, upgrade after 2 uses|--miss-precision auto --low-precision int4 --low-precision-gate 0.3 --upgrade-uses 2"
  "auto int4, gate 0.2, upgrade after 2 uses|--miss-precision auto --low-precision int4 --low-precision-gate 0.2 --upgrade-uses 2"
  "auto int4, gate 0.15, upgrade after 2 uses|--miss-precision auto --low-precision int4 --low-precision-gate 0.15 --upgrade-uses 2"
  "auto int4, gate 0.1, upgrade after 2 uses|--miss-precision auto --low-precision int4 --low-precision-gate 0.1 --upgrade-uses 2"
  "auto int4, gate 0.2, upgrade after 1 use|--miss-precision auto --low-precision int4 --low-precision-gate 0.2 --upgrade-uses 1"
  "int4, x in int8|--miss-precision int4|EF_CPU_INT8_X=int4"
  "auto int4, gate 0.3, upgrade after 2 uses, x in int8|--miss-precision auto --low-precision int4 --low-precision-gate 0.3 --upgrade-uses 2|EF_CPU_INT8_X=int4"
  "int8, x in int8 (EF_HOST_GEMV_INT8_X=all)|--miss-precision int8|EF_CPU_INT8_X=all"
  "auto, x in int8 (EF_HOST_GEMV_INT8_X=all)|--miss-precision auto|EF_CPU_INT8_X=all"
  "int8 in the last 75% of MoE layers (2-7)|--miss-precision int8 --low-precision-layers 2-7"
  "int8 in the last 50% of MoE layers (4-7)|--miss-precision int8 --low-precision-layers 4-7"
  "int8 in the last 25% of MoE layers (6-7)|--miss-precision int8 --low-precision-layers 6-7"
  "int8, GPTQ, in the last 50% of MoE layers (4-7)|--miss-precision int8 --low-precision-layers 4-7 --quantized-experts $WORK/gptq_int8.safetensors"
  "auto int4, gate 0.15, upgrade after 2 uses, last 50% of MoE layers|--miss-precision auto --low-precision int4 --low-precision-gate 0.15 --upgrade-uses 2 --low-precision-layers 4-7"
)
# Which layers carry the loss: int8 in one MoE layer at a time (LAYER_ROWS=0 skips them).
if [[ ${LAYER_ROWS:-1} != 0 ]]; then
  for l in 0 1 2 3 4 5 6 7; do configs+=("int8 in MoE layer $l only|--miss-precision int8 --low-precision-layers $l"); done
fi
rows=()
for budget in 2 4; do
  for i in "${!configs[@]}"; do
    IFS='|' read -r _ flags run_env <<<"${configs[$i]}"
    name="b${budget}_$i"
    # shellcheck disable=SC2086
    env $run_env "$BIN" score --backend cpu --model "$MODEL" --ids-file "$WORK/ids.json" --chunk 1 \
      --cache-device-budget "$budget slots per layer" --cache-policy lru $flags \
      --out "$WORK/$name.json" 2>"$WORK/$name.err"
    loaded=$(grep -o '[0-9.]* [KMG]iB loaded' "$WORK/$name.err" | head -1)
    rows+=("$budget|$i|${configs[$i]%%|*}|${loaded% loaded}")
  done
done
python3 - "$WORK" "$OUT/quality.json" "${rows[@]}" <<'PY' | tee "$OUT/quality.md"
import json, math, random, sys
work, out, rows = sys.argv[1], sys.argv[2], sys.argv[3:]
def logsoftmax(v):
    m = max(v)
    z = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - z for x in v]
ref = [[logsoftmax(v) for v in s] for s in json.load(open(f"{work}/ref.json"))["logits"]]
def interval(per_seq, draws=2000):
    # 95% interval of the token-weighted mean, resampling whole sequences (their tokens are not
    # independent: one routing flip moves every later token of its sequence).
    rng = random.Random(1)
    means = []
    for _ in range(draws):
        pick = [per_seq[rng.randrange(len(per_seq))] for _ in per_seq]
        means.append(sum(p[0] for p in pick) / sum(p[1] for p in pick))
    means.sort()
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]
records = []
n = sum(len(s) for s in ref)
print(f"{len(ref)} held-out sequences, {n} tokens; [95% interval, resampling sequences]")
print()
print("| slots per layer (of 8) | precision | top-1 agreement | mean KL per token | bytes loaded |")
print("|---|---|---|---|---|")
for r in rows:
    budget, index, precision, loaded = r.split("|")
    got = json.load(open(f"{work}/b{budget}_{index}.json"))["logits"]
    agree_seq, kl_seq = [], []
    for rs, gs in zip(ref, got):
        agree, kl = 0, 0.0
        for a, b in zip(rs, gs):
            lb = logsoftmax(b)
            agree += max(range(len(a)), key=a.__getitem__) == max(range(len(lb)), key=lb.__getitem__)
            kl += sum(math.exp(x) * (x - y) for x, y in zip(a, lb))
        agree_seq.append((agree, len(rs)))
        kl_seq.append((kl, len(rs)))
    agree, kl = sum(a for a, _ in agree_seq) / n, sum(k for k, _ in kl_seq) / n
    (a_lo, a_hi), (k_lo, k_hi) = interval(agree_seq), interval(kl_seq)
    records.append({"slots_per_layer": int(budget), "precision": precision, "tokens": n, "sequences": len(ref),
                    "top1_agreement": agree, "top1_interval95": [a_lo, a_hi], "mean_kl": kl,
                    "mean_kl_interval95": [k_lo, k_hi], "bytes_loaded": loaded})
    print(f"| {budget} | {precision} | {100 * agree:.2f}% [{100 * a_lo:.2f}, {100 * a_hi:.2f}] | "
          f"{kl:.5f} [{k_lo:.5f}, {k_hi:.5f}] | {loaded} |")
json.dump({"model": "tiny-code-moe", "tokens": n, "sequences": len(ref), "records": records}, open(out, "w"), indent=1)
PY
