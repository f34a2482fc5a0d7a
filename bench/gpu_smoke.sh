#!/usr/bin/env bash
# The GPU smoke check (bench/gpu_smoke.py), on a machine that may have no internet.
#
#   bash bench/gpu_smoke.sh                 # the project is installed already: run the checks
#   bash bench/gpu_smoke.sh WHEELS_DIR      # first install it offline from a folder of wheels, in a new venv
#                                           # that sees the machine's own torch (--system-site-packages)
#
# Preparing WHEELS_DIR: on a machine with internet and the GPU machine's Python version and platform (a login
# node, or a container of the same image), in a checkout of this repository:
#   pip wheel --wheel-dir wheels .                      # the project and every dependency (sdists built to wheels)
#   rm -f wheels/torch-* wheels/nvidia_* wheels/triton-*   # the GPU machine keeps its own CUDA build of torch
# then copy `wheels/` and this repository to the GPU machine. Every other argument goes to gpu_smoke.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [[ $# -gt 0 && -d "$1" ]]; then
    wheels="$(cd "$1" && pwd)"; shift
    venv="${WORKBENCH_SMOKE_VENV:-$(mktemp -d)/venv}"
    python3 -m venv --system-site-packages "$venv"
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
    pip install --quiet --no-index --find-links "$wheels" llm-workbench
    echo "installed $(pip show llm-workbench | grep ^Version) offline from $wheels into $venv"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python "$here/gpu_smoke.py" "$@"
