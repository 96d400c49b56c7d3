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
# SHARDS and EXTRA_ARGS. run.resume=auto comes first so EXTRA_ARGS may override it.
cxr_train_args() {
    CONFIG="$(cxr_absolute "${CONFIG:-$CXR_ROOT/trainer/configs/gpu/chexpert5/densenet121.yaml}")"
    [[ -f "$CONFIG" ]] || cxr_die "CONFIG=$CONFIG: no such trainer YAML (see trainer/configs/)"
    local name
    name="$(basename "$CONFIG" .yaml)"
    RUN_DIR="$(cxr_absolute "${RUN_DIR:-runs/$name-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}")"
    CXR_TRAIN_ARGS=(--config "$CONFIG" "run.dir=$RUN_DIR" "run.resume=auto")
    if [[ -n "${SHARDS:-}" ]]; then
        SHARDS="$(cxr_absolute "$SHARDS")"
        [[ -f "$SHARDS/manifest.json" ]] || cxr_die "SHARDS=$SHARDS: no manifest.json (pack with python -m shards.pack)"
        CXR_TRAIN_ARGS+=("data.shards=$SHARDS")
    fi
    local extra
    read -r -a extra <<<"${EXTRA_ARGS:-}"
    CXR_TRAIN_ARGS+=("${extra[@]}")
    export CONFIG RUN_DIR SHARDS
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

# cxr_after_training STATUS STAMP: exit 0 when the run finished; when the trainer checkpointed
# for a preemption (RUN_DIR/preempted.json newer than STAMP) requeue the job and exit 75;
# otherwise pass the failure on. `accelerate launch` reports 1 for any failed rank, so the
# marker, not the status, tells a preemption from a crash.
cxr_after_training() {
    local status="$1" stamp="$2"
    if [[ -f "$RUN_DIR/preempted.json" && "$RUN_DIR/preempted.json" -nt "$stamp" ]]; then
        local restarts="${SLURM_RESTART_COUNT:-0}" max="${MAX_REQUEUES:-20}"
        if [[ -n "${SLURM_JOB_ID:-}" && "$restarts" -lt "$max" ]]; then
            echo "cxrbench: preempted after a checkpoint in $RUN_DIR; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max)"
            scontrol requeue "$SLURM_JOB_ID"
        else
            echo "cxrbench: preempted after a checkpoint in $RUN_DIR; resume with RUN_DIR=$RUN_DIR and the same command"
        fi
        exit 75
    fi
    if [[ "$status" -eq 0 ]]; then
        echo "cxrbench: finished; run directory $RUN_DIR"
    else
        echo "cxrbench: training failed with status $status; see the log above and $RUN_DIR" >&2
    fi
    exit "$status"
}
