#!/usr/bin/env bash
# Every reproduction of docs/methods/repetition.md and docs/evaluation.md at its default scale, one after
# another, with each one's wall time: the set's time budget (issue 15: each at most 20 min, all at most 60 min
# on a 2-core CPU). Time it on a quiet machine: other jobs on the cores inflate every figure.
#   bash bench/reproductions.sh            # runs go to runs/ (finished runs are skipped: delete them to re-time)
# Writes runs/reproductions-time.md (a table of minutes per study) and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
out=runs/reproductions-time.md
mkdir -p runs
rows=()
total=0
step() {  # step NAME COMMAND...: run COMMAND, record its wall time
  local name=$1 start end
  shift
  echo "== $name: $*"
  start=$(date +%s)
  "$@"
  end=$(date +%s)
  total=$((total + end - start))
  rows+=("| $name | $(printf '%d min %02d s' $(((end - start) / 60)) $(((end - start) % 60))) |")
}
for study in degradation size-lr model-size data-quality objective regularisation dropout-size moe-proxy rs2; do
  step "repetition-$study" "$PYTHON" launch/study.py "configs/studies/repetition-$study.yaml" --parallel 2
done
step "repetition-moe-proxy --profile balance-off" "$PYTHON" launch/study.py configs/studies/repetition-moe-proxy.yaml \
  --profile balance-off --parallel 2
step "bose stability" "$PYTHON" evals/experiments/stability.py
step "bose consistency" "$PYTHON" evals/experiments/consistency.py
{
  echo "| reproduction | wall time |"
  echo "|---|---:|"
  printf '%s\n' "${rows[@]}"
  echo "| **all** | **$(printf '%d min %02d s' $((total / 60)) $((total % 60)))** |"
  echo
  echo "$(nproc) cores: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1); $(date -u +%F)"
} > "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
