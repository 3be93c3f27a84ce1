# Shared helpers for the mpi tests (sourced). Needs BIN (the expertflow binary).
set -euo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Quiet Open MPI's own chatter about oversubscription or missing interconnects.
export OMPI_MCA_btl_base_warn_component_unused=0 OMPI_MCA_rmaps_base_oversubscribe=1
MPIRUN=(mpirun --oversubscribe --allow-run-as-root --bind-to none)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ef_mpi_test.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
# ids.json for a model directory: the fixture's reference input_ids, or a fixed batch.
make_ids() {
  local dir=$1 out=$2
  python3 - "$dir" "$out" <<'PY'
import json, os, sys
d, out = sys.argv[1], sys.argv[2]
ref = os.path.join(d, "reference.json")
if not os.path.exists(ref):  # mixtral_sharded shares mixtral's reference
    ref = os.path.join(os.path.dirname(d), "mixtral", "reference.json")
if os.path.exists(ref) and "tiny-code-moe" not in d:
    ids = json.load(open(ref))["input_ids"]
else:
    ids = [[1, 483, 291, 1461, 272, 1191, 508, 10, 80], [1, 5, 77, 1024, 3000, 12], [1, 99, 100, 101]]
# Three sequences so ranks own different numbers of them (and rank 3 of 4 owns none).
while len(ids) < 3:
    ids = ids + [ids[0][: max(2, len(ids[0]) // 2)]]
json.dump({"input_ids": ids}, open(out, "w"))
PY
}
# The transformers fixtures and tiny-code-moe, the models the multi-rank tests run: DATA MODELS.
fixture_models() {
  local d=$1 m=$2
  echo "$d/mixtral $d/mixtral_sharded $d/qwen2_moe $d/qwen3_moe $d/olmoe $d/deepseek_v2 $d/deepseek_v3 $d/gpt_oss" \
    "$m/tiny-code-moe"
}
