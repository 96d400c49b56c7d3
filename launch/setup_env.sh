#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv/ and install cxrbench into it.
#
#   bash launch/setup_env.sh            # base install (shards, trainer)
#   bash launch/setup_env.sh dev        # + test and lint tools (and, as root, slurm-wlm + munge)
#   bash launch/setup_env.sh dev,sweep  # any extras from setup.cfg, comma-separated
#
# Every install passes launch/constraints.txt, which pins torch and torchvision as a matching
# pair: a bare `torch` requirement would pull the registry's newest build (GBs).
# On a GPU cluster whose CUDA needs another torch build, install that torch/torchvision into
# .venv first and run with CXR_KEEP_TORCH=1: the torch pins are then left out.
# Re-running is cheap: a stamp of setup.cfg + constraints + extras skips a satisfied install.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-}"
python="${PYTHON:-python3}"
venv="$root/.venv"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi

constraints="$root/launch/constraints.txt"
if [[ "${CXR_KEEP_TORCH:-0}" == "1" ]]; then
    filtered="$(mktemp)"
    trap 'rm -f "$filtered"' EXIT
    grep -vE '^(torch|torchvision)==' "$constraints" >"$filtered"
    constraints="$filtered"
fi

# The dev extra runs the launch tests on a real local SLURM: its system packages come first.
if [[ ",$extras," == *,dev,* ]]; then
    bash "$root/launch/system_packages.sh"
fi

stamp="$venv/.cxrbench-install"
want="$(cat setup.cfg "$constraints" | sha256sum | cut -c1-16) extras=${extras} keep_torch=${CXR_KEEP_TORCH:-0}"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

target="."
[[ -n "$extras" ]] && target=".[${extras}]"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" -e "$target"
echo "$want" >"$stamp"
echo "cxrbench installed into $venv (extras: ${extras:-none})"
