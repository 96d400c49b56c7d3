#!/usr/bin/env bash
# Download, into .whl/ at the repo root (git-ignored), the wheels that the lent GPU machine lacks
# for bench/gpu.py. That machine has its own Python 3.12 with torch, torchvision, timm, accelerate,
# tensorboard, safetensors, numpy, pillow, pyyaml, tqdm, scikit-learn, but no package index; the
# import chain of bench/gpu.py (shards.stream.decode, shards.pack -> shards.pack.shardio) also needs
# simplejpeg and webdataset (+ braceexpand). Everything else it imports is in that image.
#
# Run here (where the registry is reachable):   bash bench/gpu_wheels.sh
# Then the one device command (run from the repo root, `.whl` carried; ~7.5 minutes):
#   set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#       --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
#       && python3 bench/gpu.py --out $OUT 2>&1 | tee $OUT/gpu.log
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Pinned as in launch/constraints.txt; one version of each (two in .whl/ stop the whole install).
WHEELS=(simplejpeg==1.9.0 webdataset==1.0.2 braceexpand==0.1.7)

mkdir -p .whl
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    version=${spec##*==}
    for old in .whl/"${name}"-*.whl; do
        [[ -e $old && $old != .whl/"${name}-${version}"-* ]] && rm -f -- "$old"
    done
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    version=${spec##*==}
    if ! compgen -G ".whl/${name}-${version}-*.whl" >/dev/null; then
        echo "gpu_wheels: ${spec} was not downloaded" >&2
        exit 1
    fi
done
ls -l .whl/
