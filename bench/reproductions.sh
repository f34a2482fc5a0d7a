#!/usr/bin/env bash
# The reproductions of docs/methods/repetition.md and docs/evaluation.md at their default scale, one after
# another, with each one's wall time. Issue 15's budget (a 2-core CPU): each at most 20 min, the set it re-ran
# at most 60 min. Time it on a quiet machine: other jobs on the cores inflate every figure.
#   bash bench/reproductions.sh               # the set issue 15 re-ran (BOSE, and the repetition studies it changed)
#   bash bench/reproductions.sh supplementary # the five repetition studies it left as they were, and the
#                                             # moe-proxy balance-off profile (a non-default check)
#   bash bench/reproductions.sh verdicts      # the ALLoRA, Masked Thought and SeND verdicts (issue 29: each at most
#                                             # 20 min at the speed below; each publishes docs/results/<study>/)
#   bash bench/reproductions.sh all           # all of them
# Runs go to runs/ (finished runs are skipped: delete runs/<study> to re-time one). Writes
# runs/reproductions-time-<set>.md (minutes per reproduction, subtotal) and prints it.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
which=${1:-issue}
out=runs/reproductions-time-$which.md
mkdir -p runs
rows=()
total=0
step() {  # step NAME COMMAND...: run COMMAND, record its wall time (and a failure)
  local name=$1 start end status=""
  shift
  echo "== $name: $*"
  start=$(date +%s)
  "$@" || status=" (FAILED, exit $?)"
  end=$(date +%s)
  total=$((total + end - start))
  rows+=("| \`$name\`$status | $(printf '%d min %02d s' $(((end - start) / 60)) $(((end - start) % 60))) |")
}
study() { step "$*" "$PYTHON" launch/study.py "configs/studies/$1.yaml" "${@:2}" --parallel 2; }
# The machine's speed, before and after the set: ms per fp32 training step of the dense moe-proxy model on
# all cores (bench/moe_proxy_cost.py, about 10 s). Machines of one type differed 1.46x between sessions; compare
# a set's time with another session's only through this figure.
speed() { "$PYTHON" bench/moe_proxy_cost.py --steps 10 --repeats 3 | sed -n 's/^ *mixtral-dense-tiny .* \([0-9.]* ms\/step\).*/\1/p'; }
speed_before=$(speed)
if [[ $which == issue || $which == all ]]; then
  study repetition-degradation
  study repetition-size-lr
  study repetition-regularisation
  study repetition-moe-proxy
  step "workbench_eval/experiments/stability.py" "$PYTHON" workbench_eval/experiments/stability.py
  step "workbench_eval/experiments/consistency.py" "$PYTHON" workbench_eval/experiments/consistency.py
fi
if [[ $which == verdicts || $which == all ]]; then
  study allora
  study masked-thought
  study send
fi
if [[ $which == supplementary || $which == all ]]; then
  for name in model-size dropout-size data-quality objective rs2; do study "repetition-$name"; done
  study repetition-moe-proxy --profile balance-off   # not the default scale: the collapse check of issue 15
fi
{
  echo "| reproduction ($which) | wall time |"
  echo "|---|---:|"
  printf '%s\n' "${rows[@]}"
  echo "| **together** | **$(printf '%d min %02d s' $((total / 60)) $((total % 60)))** |"
  echo
  echo "$(nproc) cores: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1); $(date -u +%F)"
  echo "machine speed (bench/moe_proxy_cost.py, mixtral-dense-tiny, fp32): $speed_before before the set, $(speed) after"
} > "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
