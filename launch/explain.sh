#!/usr/bin/env bash
#SBATCH --job-name=cxrbench-explain
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
#
# Heatmaps for trained runs on one GPU:   RUNS="runs/densenet121-1234 runs/vit-1235" sbatch launch/explain.sh
# Grad-CAM / Grad-CAM++ for CNNs, Grad-CAM and attention rollout for ViT-family models, scored
# against the lesion masks in the shards (pointing game, energy in mask, deletion/insertion).
#
# Environment:
#   RUNS           run directories with best/ (space-separated; several = side by side)  [required]
#   SHARDS         shards to explain [each run's data.shards]
#   SPLIT          split [test];  N  samples per label [32];  LABELS  e.g. "competition5" [all shared]
#   METHODS        gradcam,gradcam++,rollout [the job's default]
#   OUT            output folder [<first run>/explain]
#   GPUS_PER_NODE  1 = the allocated GPU [1]; 0 = CPU (how the tests run it)
#   CXR_ROOT, CXR_VENV  as in launch/h100_8gpu.sh
# Output: OUT/index.html (gallery), OUT/localization.json and .md, PNG overlays, TensorBoard images.
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

read -r -a runs <<<"${RUNS:-}"
[[ ${#runs[@]} -gt 0 ]] || cxr_die "RUNS is empty: set it to one or more run directories (with best/)"
for i in "${!runs[@]}"; do
    runs[i]="$(cxr_absolute "${runs[i]}")"
    [[ -f "${runs[i]}/best/model.safetensors" ]] || cxr_die "RUNS: ${runs[i]} has no best/model.safetensors"
done
out="$(cxr_absolute "${OUT:-${runs[0]}/explain}")"
device=cuda
[[ "${GPUS_PER_NODE:-1}" -eq 0 ]] && device=cpu
args=(--run "${runs[@]}" --split "${SPLIT:-test}" --n "${N:-32}" --out "$out" --device "$device" --no-progress)
[[ -n "${SHARDS:-}" ]] && args+=(--shards "$(cxr_absolute "$SHARDS")")
[[ -n "${METHODS:-}" ]] && args+=(--methods "$METHODS")
if [[ -n "${LABELS:-}" ]]; then
    read -r -a labels <<<"$LABELS"
    args+=(--labels "${labels[@]}")
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}}"

echo "cxrbench: explain ${runs[*]} on $(hostname) ($device) -> $out"
status=0
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    srun --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$CXR_PYTHON" -m trainer.explain "${args[@]}" || status=$?
else
    "$CXR_PYTHON" -m trainer.explain "${args[@]}" || status=$?
fi
[[ "$status" -eq 0 ]] && echo "cxrbench: gallery $out/index.html, scores $out/localization.md"
exit "$status"
