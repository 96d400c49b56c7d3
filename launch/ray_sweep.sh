#!/usr/bin/env bash
#SBATCH --job-name=cxrbench-sweep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=96
#SBATCH --mem=960G
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# A Ray Tune sweep across the allocation:   SPACE=sweeps/spaces/freeze_x_model.yaml sbatch --nodes=4 launch/ray_sweep.sh
# A whole study (every cell x SEEDS seeds, tested, reported; python -m sweeps.study):
#   SPACE=sweeps/spaces/study_chexpert.yaml SEEDS=3 EXTRA_ARGS="data.shards=..." sbatch --nodes=4 launch/ray_sweep.sh
# Starts a Ray head on the first node and a Ray worker on every other node (srun, one task per
# node), runs `python -m sweeps.run --address HEAD:PORT` on the head, and stops Ray on exit,
# whatever the outcome. A requeued or resubmitted job with the same NAME resumes the sweep
# (--resume: finished trials are kept, unfinished ones continue from their checkpoints).
#
# Environment:
#   SPACE          search space YAML (sweeps/spaces/)               [sweeps/spaces/demo_cpu.yaml]
#   NAME           sweep name                                       [the space file's name]
#   STORAGE        where sweeps live; must be on a shared file system [runs/sweeps]
#   TRIALS         override the space's trial count                 [the space's]
#   SEEDS          run a study instead (sweeps.study --seeds SEEDS), stored under runs/studies
#   GPUS_PER_NODE  GPUs Ray may hand to trials per node [8]; 0 on a CPU allocation
#   EXTRA_ARGS     trainer overrides for every trial, e.g. "data.shards=data/shards/chexpert"
#   RAY_PORT       the head's GCS port                              [a free port on the head]
#   DASHBOARD      1: the Ray dashboard on the head node's 127.0.0.1:8265 only (needs ray[default]);
#                  the job's token goes to ~/.cxrbench/ray-token-JOBID (mode 600, removed at the
#                  end). Reach it: ssh -L 8265:127.0.0.1:8265 HEAD (the log names HEAD), then
#                  http://127.0.0.1:8265 with that token (API: 'Authorization: Bearer TOKEN'). [0]
#   CXR_ROOT, CXR_VENV  as in launch/h100_8gpu.sh
# Results: STORAGE/NAME/results.md, results.csv, best.yaml; trials' TensorBoard logs under
# STORAGE/NAME/trials/. Log: %x-%j.out in the submit directory. The Ray dashboard is off unless
# DASHBOARD=1, and the cluster takes only clients holding this job's token (RAY_AUTH_MODE=token, a
# fresh RAY_AUTH_TOKEN per job, passed to the nodes in the job's environment).
set -euo pipefail

# sbatch runs a copy of this file from its spool: find the checkout from the submitted path.
root="${CXR_ROOT:-}"
if [[ -z "$root" && -n "${SLURM_JOB_ID:-}" ]]; then
    script="$(scontrol show job "$SLURM_JOB_ID" | grep -oE 'Command=[^ ]+' | head -n1 | cut -d= -f2-)"
    root="$(cd "$(dirname "$script")/.." 2>/dev/null && pwd)" || root="${SLURM_SUBMIT_DIR:-$PWD}"
fi
root="${root:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=launch/common.sh
source "$root/launch/common.sh" || { echo "error: $root/launch/common.sh not found: set CXR_ROOT" >&2; exit 2; }
cxr_setup "$root"
[[ -n "${SLURM_JOB_ID:-}" ]] || cxr_die "launch/ray_sweep.sh runs under sbatch; on one machine use python -m sweeps.run --address local"

space="$(cxr_absolute "${SPACE:-$CXR_ROOT/sweeps/spaces/demo_cpu.yaml}")"
[[ -f "$space" ]] || cxr_die "SPACE=$space: no such search space (see sweeps/spaces/)"
name="${NAME:-$(basename "$space" .yaml)}"
kind=sweep
[[ -n "${SEEDS:-}" ]] && kind=study
storage="$(cxr_absolute "${STORAGE:-runs/${kind}s}")"
gpus="${GPUS_PER_NODE:-8}"
cpus="${SLURM_CPUS_PER_TASK:-$(nproc)}"
ray="$(dirname "$CXR_PYTHON")/ray"
cxr_main_address
head_ip="$MAIN_ADDR"
port="${RAY_PORT:-$MAIN_PORT}"
# Object store: a tenth of the node's memory (Ray's default of 30% of the machine ignores --mem).
memory_mb="${SLURM_MEM_PER_NODE:-8192}"
store_bytes=$(( memory_mb * 1024 * 1024 / 10 ))
export RAY_AIR_NEW_OUTPUT=0 RAY_DEDUP_LOGS=1 RAY_USAGE_STATS_ENABLED=0
# Ray's token authentication, with a fresh token per job: srun hands the environment to every
# node's `ray start`, the driver and `ray status`; nobody else on the network can submit work.
RAY_AUTH_TOKEN="$("$CXR_PYTHON" -c 'import secrets; print(secrets.token_hex(32))')"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN

dashboard=(--include-dashboard=false)
token_file=""
if [[ "${DASHBOARD:-0}" == "1" ]]; then
    "$CXR_PYTHON" -c 'import ray.dashboard.optional_deps' 2>/dev/null \
        || cxr_die "DASHBOARD=1 needs ray[default]: bash launch/setup_env.sh dashboard"
    # Loopback only: reached through an ssh tunnel, never from the cluster network.
    dashboard=(--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port=8265)
    token_file="$HOME/.cxrbench/ray-token-$SLURM_JOB_ID"
    (umask 077 && mkdir -p "$(dirname "$token_file")" && printf '%s\n' "$RAY_AUTH_TOKEN" >"$token_file")
fi

steps=()
# shellcheck disable=SC2329  # called by the EXIT trap
stop_ray() {
    for pid in "${steps[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -z "$token_file" ]] || rm -f "$token_file"
}
trap stop_ray EXIT

echo "cxrbench: $kind $name ($space) on $SLURM_JOB_NODELIST; Ray head $head_ip:$port"
srun --nodes=1 --ntasks=1 --relative=0 --cpus-per-task="$cpus" --kill-on-bad-exit=1 \
    "$ray" start --head --block --node-ip-address="$head_ip" --port="$port" --num-cpus="$cpus" \
    --num-gpus="$gpus" "${dashboard[@]}" --object-store-memory="$store_bytes" &
steps+=("$!")
until "$ray" status --address="$head_ip:$port" >/dev/null 2>&1; do
    kill -0 "${steps[0]}" 2>/dev/null || cxr_die "the Ray head did not start (see the log above)"
    sleep 2
done
if [[ -n "$token_file" ]]; then
    echo "cxrbench: Ray dashboard on $(hostname) at 127.0.0.1:8265 only: ssh -L 8265:127.0.0.1:8265 $(hostname)," \
        "then http://127.0.0.1:8265; token in $token_file (removed when the job ends)"
fi
workers=$(( ${SLURM_NNODES:-1} - 1 ))
if [[ "$workers" -gt 0 ]]; then
    srun --nodes="$workers" --ntasks="$workers" --relative=1 --cpus-per-task="$cpus" \
        "$ray" start --block --address="$head_ip:$port" --num-cpus="$cpus" --num-gpus="$gpus" \
        --object-store-memory="$store_bytes" &
    steps+=("$!")
fi

args=(--space "$space" --address "$head_ip:$port" --name "$name" --storage "$storage")
if [[ "$kind" == study ]]; then
    module=sweeps.study state=study.json
    args+=(--seeds "$SEEDS")
else
    module=sweeps.run state=tuner.pkl
    [[ -n "${TRIALS:-}" ]] && args+=(--trials "$TRIALS")
fi
[[ -f "$storage/$name/$state" ]] && args+=(--resume) && echo "cxrbench: resuming $kind $storage/$name"
read -r -a extra <<<"${EXTRA_ARGS:-}"
status=0
"$CXR_PYTHON" -m "$module" "${args[@]}" "${extra[@]}" || status=$?
echo "cxrbench: $kind exited $status; results in $storage/$name"
exit "$status"
