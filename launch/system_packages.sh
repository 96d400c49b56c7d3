#!/usr/bin/env bash
# System packages the test suite runs for real: SLURM (slurmctld, slurmd, sbatch, ...) and munge,
# from the distribution (Debian/Ubuntu: slurm-wlm, munge). Called by `setup_env.sh dev`.
# Installs only what is missing, only as root with apt-get; otherwise says what the SLURM tests
# need and leaves them to skip (CI sets CXR_REQUIRE_SLURM=1 so that they fail instead).
set -euo pipefail

missing=()
for tool in sbatch slurmctld slurmd munged; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || missing+=("$tool")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: ${missing[*]} not installed: the SLURM launch tests will skip" \
         "(as root: apt-get install slurm-wlm munge)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q slurm-wlm munge >/dev/null; }
install || { apt-get update -q >/dev/null && install; }
echo "installed slurm-wlm and munge (for the launch tests)"
