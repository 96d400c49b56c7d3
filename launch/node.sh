#!/usr/bin/env bash
# One node's share of a training run: one `accelerate launch` starting GPUS_PER_NODE ranks of
# trainer/run.py. Started by launch/h100_8gpu.sh and launch/multinode.sh (through srun, one task
# per node), never submitted by itself. Arguments: the trainer's (--config ... key=value ...).
#
# Reads (exported by the job script): CXR_ROOT, CXR_ACCELERATE, GPUS_PER_NODE, ACCELERATE_CONFIG,
# MAIN_ADDR, MAIN_PORT; NUM_MACHINES and MACHINE_RANK default to srun's SLURM_NTASKS and
# SLURM_PROCID (one task per node, so the task rank is the node rank).
#
# Signals: SLURM's warning signal (SIGUSR1, --signal=USR1@grace or `scancel --signal=USR1`)
# reaches every process of the step. The launcher must survive it — its default action would
# kill the launcher and every rank without a checkpoint — so it starts with SIGUSR1 ignored; the
# ranks install their own handler (checkpoint, exit 75) and the loader workers ignore it.
set -euo pipefail

gpus="${GPUS_PER_NODE:-8}"
machines="${NUM_MACHINES:-${SLURM_NTASKS:-1}}"
machine_rank="${MACHINE_RANK:-${SLURM_PROCID:-0}}"
accelerate_config="${ACCELERATE_CONFIG:-ddp_bf16}"
[[ "$accelerate_config" == */* || "$accelerate_config" == *.yaml ]] ||
    accelerate_config="$CXR_ROOT/launch/accelerate/$accelerate_config.yaml"
[[ -f "$accelerate_config" ]] || { echo "error: ACCELERATE_CONFIG=$accelerate_config not found" >&2; exit 2; }

# The network interface holding this node's SLURM address (NodeAddr), e.g. ib0 or eth0.
node_interface() {
    local address
    address="$(scontrol show node "${SLURMD_NODENAME:-}" 2>/dev/null | grep -oE 'NodeAddr=[^ ]+' | head -n1 | cut -d= -f2)"
    [[ -n "$address" ]] || return 0
    [[ "$address" =~ ^[0-9.]+$ ]] || address="$(getent ahostsv4 "$address" | awk 'NR == 1 { print $1 }')"
    ip -o -4 addr show 2>/dev/null | awk -v a="$address" '{ split($4, p, "/"); if (p[1] == a) print $2 }' | head -n1
}

launch=(--num_machines "$machines" --machine_rank "$machine_rank"
        --main_process_ip "${MAIN_ADDR:-127.0.0.1}" --main_process_port "${MAIN_PORT:-29500}")
if [[ "$gpus" -eq 0 ]]; then
    # CPU allocation: two processes per node on gloo. `--cpu` alone silently runs one process
    # whatever --num_processes says; ACCELERATE_USE_CPU=1 with --multi_gpu gives real DDP on gloo.
    # DeepSpeed finds the CPU by itself and is switched off by ACCELERATE_USE_CPU, so it keeps its
    # config.
    per_node=2
    # gloo announces the address this host's *name* resolves to, often 127.0.0.1 in /etc/hosts:
    # other nodes could not connect back. Pin it to the interface SLURM reaches this node on.
    if [[ "$machines" -gt 1 && -z "${GLOO_SOCKET_IFNAME:-}" ]]; then
        interface="$(node_interface || true)"
        [[ -n "$interface" ]] && export GLOO_SOCKET_IFNAME="$interface"
    fi
    if grep -q "distributed_type: DEEPSPEED" "$accelerate_config"; then
        launch+=(--config_file "$accelerate_config" --mixed_precision no)
    else
        export ACCELERATE_USE_CPU=1
        launch+=(--multi_gpu --mixed_precision no)
    fi
else
    per_node="$gpus"
    launch+=(--config_file "$accelerate_config")
fi
launch+=(--num_processes "$((per_node * machines))" --dynamo_backend no)
# What this node was given, for the trainer's check: a GPU launch on a node whose CUDA does not
# work stops with one line instead of training on the CPU (0 = a CPU run on purpose).
export CXR_EXPECT_GPUS="$gpus"

# Loader workers and intra-op threads share the task's CPUs.
cpus="${SLURM_CPUS_PER_TASK:-$(nproc)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cpus / per_node > 0 ? cpus / per_node : 1 ))}"

echo "cxrbench node $machine_rank/$machines on $(hostname): $per_node processes, main ${MAIN_ADDR:-127.0.0.1}:${MAIN_PORT:-29500}${GLOO_SOCKET_IFNAME:+, gloo on $GLOO_SOCKET_IFNAME}"
trap '' USR1
exec "$CXR_ACCELERATE" launch "${launch[@]}" "$CXR_ROOT/trainer/run.py" "$@"
