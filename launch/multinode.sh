#!/usr/bin/env bash
#SBATCH --job-name=cxrbench-multi
#SBATCH --nodes=2
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
# Train one model on N nodes x 8 GPUs:   sbatch --nodes=4 launch/multinode.sh
# One `accelerate launch` per node (srun, one task per node): machine rank = the task's rank,
# main process = the first node of the allocation (where this script runs) on a port free there.
#
# Environment: as launch/h100_8gpu.sh (CONFIG, RUN_DIR, SHARDS, GPUS_PER_NODE, ACCELERATE_CONFIG,
# EXTRA_ARGS, MAX_REQUEUES, COLLECTIVE_TIMEOUT, CXR_ROOT, CXR_VENV); RUN_DIR and SHARDS must be on a shared file
# system (every node reads the shards; rank 0 writes the run, all ranks write checkpoint shards).
# The global batch is data.batch_size x GPUS_PER_NODE x nodes x optim.grad_accum: scale optim.lr
# with it (EXTRA_ARGS) when you change the node count.
#
# NCCL (set before sbatch; exported to every node):
#   NCCL_SOCKET_IFNAME  the interface for bootstrap/socket traffic, e.g. ib0 or eth0 (NCCL
#                       guesses, sometimes a docker or loopback one: set it when a job hangs at start)
#   NCCL_IB_HCA         which InfiniBand adapters to use (e.g. mlx5); NCCL_IB_DISABLE=1 for TCP only
#   NCCL_DEBUG=INFO     prints the chosen transport per ring (default here: WARN)
#   GLOO_SOCKET_IFNAME  CPU runs (gloo): set per node to the interface holding its SLURM NodeAddr,
#                       since the host name often resolves to 127.0.0.1 and peers could not connect
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (default here): a dead peer aborts the job instead of hanging
#                       until the collective timeout, so SLURM frees the nodes
#
# Preemption and exit status as launch/h100_8gpu.sh: SIGUSR1 reaches every node's ranks, all
# agree on the same step, checkpoint, exit 75, and the job is requeued as a whole.
# A lost node: when every process of one node dies, srun (--kill-on-bad-exit) ends the other
# nodes' tasks at once; when a node freezes, the others' collectives fail after COLLECTIVE_TIMEOUT
# and srun ends the rest. Either way the job is requeued (at most MAX_REQUEUES times) and resumes
# from the last complete checkpoint; what was trained since it is lost (run.checkpoint_every bounds
# it). A node that SLURM itself sees fail (slurmd silent) ends as NODE_FAIL and --requeue requeues it.
# On CPU nodes (GPUS_PER_NODE=0) each node runs 2 processes on gloo. The tests run two machine
# ranks on one host: sbatch --nodes=1 --ntasks-per-node=2 --gres=none ... launch/multinode.sh
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
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}" TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
cxr_train_args
cxr_main_address
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}" ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-ddp_bf16}"
unset NUM_MACHINES MACHINE_RANK  # from srun: SLURM_NTASKS, SLURM_PROCID

echo "cxrbench: job ${SLURM_JOB_ID:-local} restart ${SLURM_RESTART_COUNT:-0} on $(hostname)"
echo "cxrbench: CONFIG=$CONFIG RUN_DIR=$RUN_DIR GPUS_PER_NODE=$GPUS_PER_NODE ACCELERATE_CONFIG=$ACCELERATE_CONFIG"
cxr_begin_attempt

status=0
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    echo "cxrbench: ${SLURM_NTASKS:-1} machine ranks on $SLURM_JOB_NODELIST"
    srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 bash "$CXR_ROOT/launch/node.sh" "${CXR_TRAIN_ARGS[@]}" || status=$?
else
    cxr_die "launch/multinode.sh runs under sbatch; for one node use launch/h100_8gpu.sh"
fi
cxr_after_training "$status"
