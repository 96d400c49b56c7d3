#!/usr/bin/env bash
#SBATCH --job-name=cxrbench
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=96
#SBATCH --mem=960G
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Train one model on one 8-GPU node:   sbatch launch/h100_8gpu.sh
# (or `bash launch/h100_8gpu.sh` on a workstation without SLURM).
#
# Environment (all optional; relative paths are taken from where you run sbatch):
#   CONFIG            trainer YAML        [trainer/configs/gpu/chexpert5/densenet121.yaml]
#   RUN_DIR           run directory; a requeued or resubmitted job with the same RUN_DIR resumes
#                     from its latest checkpoint          [runs/<config name>-<job id>]
#   SHARDS            packed shard folder (has manifest.json)     [data.shards of CONFIG]
#   GPUS_PER_NODE     ranks per node, one per GPU [8]; 0 = a CPU allocation with 2 processes on gloo
#   ACCELERATE_CONFIG ddp_bf16 | zero2 | zero3 (launch/accelerate/*.yaml) or a path  [ddp_bf16]
#   EXTRA_ARGS        trainer overrides, space-separated: "optim.lr=1e-4 model.freeze=head"
#   MAX_REQUEUES      give up requeueing after this many restarts (preemptions and lost nodes) [20]
#   COLLECTIVE_TIMEOUT seconds a rank waits for a silent peer before failing: the bound on a hang
#                     when a node dies or freezes (run.collective_timeout; NCCL's watchdog heartbeat
#                     is set to it + 60) [120 with GPUS_PER_NODE=0, else 180]
#   CXR_ROOT, CXR_VENV  the checkout and its venv [found from the submitted script; CXR_ROOT/.venv]
#
# Resources: 12 CPUs and 120 GB per GPU feed 8 loader workers per rank; change them on the sbatch
# line, not here (`sbatch --cpus-per-task=64 --mem=512G ...`). A CPU-only try:
#   GPUS_PER_NODE=0 CONFIG=trainer/configs/demo_cpu.yaml sbatch --gres=none --cpus-per-task=2 --mem=8G launch/h100_8gpu.sh
#
# Preemption: 300 s before the time limit SLURM sends SIGUSR1 to the training step; the ranks
# checkpoint and exit 75, this script sees RUN_DIR/preempted.json, runs `scontrol requeue`, and the
# requeued job (same id, same RUN_DIR) resumes from the checkpoint, appending to metrics.jsonl and
# the TensorBoard run.
# Failures: a rank whose own work failed (a crash, a bad config, a full disk) fails the job, not
# requeued. A rank that lost a peer (a node died or froze: its collectives fail within
# COLLECTIVE_TIMEOUT), or a task ended by a signal, is a lost node, not a bug: requeued like a
# preemption, resuming from the last complete checkpoint (the ranks say which in
# RUN_DIR/.failures-*/, trainer/failures.py). Requeues stop after MAX_REQUEUES, with a line saying so.
# Exit status: 0 finished, 75 requeued (or given up after MAX_REQUEUES), else the failure's.
# Log: %x-%j.out in the submit directory (appended across requeues).
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
cxr_train_args
cxr_main_address
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}" ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-ddp_bf16}"
export NUM_MACHINES=1 MACHINE_RANK=0

echo "cxrbench: job ${SLURM_JOB_ID:-local} restart ${SLURM_RESTART_COUNT:-0} on $(hostname)"
echo "cxrbench: CONFIG=$CONFIG RUN_DIR=$RUN_DIR GPUS_PER_NODE=$GPUS_PER_NODE ACCELERATE_CONFIG=$ACCELERATE_CONFIG"
cxr_begin_attempt

status=0
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    srun --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 bash "$CXR_ROOT/launch/node.sh" "${CXR_TRAIN_ARGS[@]}" || status=$?
else
    bash "$CXR_ROOT/launch/node.sh" "${CXR_TRAIN_ARGS[@]}" || status=$?
fi
cxr_after_training "$status"
