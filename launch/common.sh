# shellcheck shell=bash
# Sourced by launch/*.sh: finds the checkout and its venv, turns the documented environment
# variables into trainer arguments, and decides what a finished step means (done, requeue, fail).

cxr_die() {
    echo "error: $*" >&2
    exit 2
}

# cxr_setup ROOT: sets CXR_ROOT, CXR_PYTHON, CXR_ACCELERATE; checks the checkout and its venv.
cxr_setup() {
    CXR_ROOT="$1"
    [[ -f "$CXR_ROOT/trainer/run.py" ]] ||
        cxr_die "CXR_ROOT=$CXR_ROOT is not a cxrbench checkout (no trainer/run.py): submit from the checkout or set CXR_ROOT"
    local venv="${CXR_VENV:-$CXR_ROOT/.venv}"
    CXR_PYTHON="$venv/bin/python"
    CXR_ACCELERATE="$venv/bin/accelerate"
    [[ -x "$CXR_ACCELERATE" ]] ||
        cxr_die "$CXR_ACCELERATE not found: run 'bash launch/setup_env.sh' in $CXR_ROOT first (or set CXR_VENV)"
    export CXR_ROOT CXR_PYTHON CXR_ACCELERATE
    export PYTHONPATH="$CXR_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

# cxr_absolute PATH: PATH made absolute against the current directory (where sbatch was run).
cxr_absolute() {
    case "$1" in
        /*) echo "$1" ;;
        *) echo "$PWD/$1" ;;
    esac
}

# cxr_train_args: the trainer's arguments in the array CXR_TRAIN_ARGS, from CONFIG, RUN_DIR,
# SHARDS, COLLECTIVE_TIMEOUT and EXTRA_ARGS. run.resume=auto and run.collective_timeout come first
# so EXTRA_ARGS may override them.
cxr_train_args() {
    CONFIG="$(cxr_absolute "${CONFIG:-$CXR_ROOT/trainer/configs/gpu/chexpert5/densenet121.yaml}")"
    [[ -f "$CONFIG" ]] || cxr_die "CONFIG=$CONFIG: no such trainer YAML (see trainer/configs/)"
    local name
    name="$(basename "$CONFIG" .yaml)"
    RUN_DIR="$(cxr_absolute "${RUN_DIR:-runs/$name-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}")"
    # How long a rank waits for a silent peer (a dead or frozen node) before failing: the bound on
    # a hang. NCCL's watchdog heartbeat follows it, so a stuck collective cannot outlive it either.
    COLLECTIVE_TIMEOUT="${COLLECTIVE_TIMEOUT:-$([[ "${GPUS_PER_NODE:-8}" -eq 0 ]] && echo 120 || echo 180)}"
    export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC="${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-$((COLLECTIVE_TIMEOUT + 60))}"
    CXR_TRAIN_ARGS=(--config "$CONFIG" "run.dir=$RUN_DIR" "run.resume=auto"
                    "run.collective_timeout=$COLLECTIVE_TIMEOUT")
    if [[ -n "${SHARDS:-}" ]]; then
        SHARDS="$(cxr_absolute "$SHARDS")"
        [[ -f "$SHARDS/manifest.json" ]] || cxr_die "SHARDS=$SHARDS: no manifest.json (pack with python -m shards.pack)"
        CXR_TRAIN_ARGS+=("data.shards=$SHARDS")
    fi
    local extra
    read -r -a extra <<<"${EXTRA_ARGS:-}"
    CXR_TRAIN_ARGS+=("${extra[@]}")
    export CONFIG RUN_DIR SHARDS COLLECTIVE_TIMEOUT
}

# cxr_begin_attempt: in RUN_DIR, a stamp (what this attempt wrote is newer) and an empty folder
# where failing ranks say why (trainer/failures.py reads CXR_FAILURE_DIR); both removed on exit.
cxr_begin_attempt() {
    mkdir -p "$RUN_DIR"
    CXR_STAMP="$(mktemp "$RUN_DIR/.launch-XXXXXX")"
    CXR_FAILURE_DIR="$(mktemp -d "$RUN_DIR/.failures-XXXXXX")"
    export CXR_STAMP CXR_FAILURE_DIR
    trap 'rm -rf "$CXR_STAMP" "$CXR_FAILURE_DIR"' EXIT
}

# cxr_requeue REASON: requeue this job (same id, same RUN_DIR: it resumes from the last complete
# checkpoint) unless it has been requeued MAX_REQUEUES times already; exits 75 either way.
cxr_requeue() {
    local reason="$1" restarts="${SLURM_RESTART_COUNT:-0}" max="${MAX_REQUEUES:-20}"
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "cxrbench: $reason; resume with RUN_DIR=$RUN_DIR and the same command"
    elif [[ "$restarts" -lt "$max" ]]; then
        echo "cxrbench: $reason; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max)"
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "cxrbench: $reason; NOT requeued: job $SLURM_JOB_ID was already requeued $restarts times" \
            "(MAX_REQUEUES=$max). Resume by hand with RUN_DIR=$RUN_DIR and the same command" >&2
    fi
    exit 75
}

# cxr_main_address: the first node of the allocation (the batch shell runs there) and a port
# that is free on it, for torch's rendezvous. The address is the node's NodeAddr in SLURM (what
# SLURM itself uses to reach it), else its name.
cxr_main_address() {
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        local first address
        first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
        address="$(scontrol show node "$first" 2>/dev/null | grep -oE 'NodeAddr=[^ ]+' | head -n1 | cut -d= -f2)"
        MAIN_ADDR="${MAIN_ADDR:-${address:-$first}}"
    else
        MAIN_ADDR="${MAIN_ADDR:-127.0.0.1}"
    fi
    MAIN_PORT="${MAIN_PORT:-$("$CXR_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}"
    export MAIN_ADDR MAIN_PORT
}

# cxr_after_training STATUS: what a finished step means.
#  - RUN_DIR/preempted.json newer than the stamp: the ranks checkpointed on SLURM's warning
#    signal: requeue.
#  - status 0: finished.
#  - a rank recorded an error of its own (a crash, a bad config, a full disk): fail, no requeue,
#    since it would fail again.
#  - otherwise, a rank recorded that a peer vanished, or a task was ended by a signal (srun reports
#    128 + signal: a node's processes killed, or srun ending the other nodes after that): a node
#    was lost, not the code: requeue, and resume from the last complete checkpoint.
#  - anything else: fail.
# `accelerate launch` reports 1 for any failed rank, so the markers, not the status, tell these
# apart. Requeues are bounded by MAX_REQUEUES (cxr_requeue).
cxr_after_training() {
    local status="$1" errors=() lost=()
    if [[ -f "$RUN_DIR/preempted.json" && "$RUN_DIR/preempted.json" -nt "$CXR_STAMP" ]]; then
        cxr_requeue "preempted after a checkpoint in $RUN_DIR"
    fi
    if [[ "$status" -eq 0 ]]; then
        echo "cxrbench: finished; run directory $RUN_DIR"
        exit 0
    fi
    mapfile -t errors < <(grep -l '"kind": "error"' "$CXR_FAILURE_DIR"/rank-*.json 2>/dev/null)
    mapfile -t lost < <(grep -l '"kind": "peer-lost"' "$CXR_FAILURE_DIR"/rank-*.json 2>/dev/null)
    if [[ "${#errors[@]}" -eq 0 && ( "${#lost[@]}" -gt 0 || "$status" -gt 128 ) ]]; then
        cxr_requeue "a node or process of the job was lost (status $status; ${#lost[@]} ranks lost a peer), not a failure of the run"
    fi
    if [[ "${#errors[@]}" -gt 0 ]]; then
        echo "cxrbench: training failed with status $status, not requeued (the run itself failed):" >&2
        sed -n 's/^  "error": "\(.*\)",\{0,1\}$/  \1/p' "${errors[@]}" | sort -u >&2
    else
        echo "cxrbench: training failed with status $status; see the log above and $RUN_DIR" >&2
    fi
    exit "$status"
}
