#!/usr/bin/env bash
# Install the single-node SLURM that tests/slurm_cluster.py starts (Debian 12: SLURM 22.05).
#
# Idempotent: a machine that already has every binary returns at once without touching apt.
# Only installs packages; it starts nothing and writes no slurm.conf. The pytest fixture
# generates the config under a temporary directory and owns the daemons' lifetime, so a
# half-configured machine can never leak state from one test session into the next.
#
# Usage (as root, or with passwordless sudo):  bash .ci/slurm-setup.sh
set -euo pipefail

packages=(munge slurmctld slurmd slurm-client)
binaries=(munged mungekey slurmctld slurmd sbatch squeue sinfo scontrol scancel)

have_all() {
    local b
    for b in "${binaries[@]}"; do
        command -v "$b" >/dev/null 2>&1 || [[ -x "/usr/sbin/$b" ]] || return 1
    done
}

if have_all; then
    echo "slurm-setup: munge and SLURM already installed"
    exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then
    sudo="sudo"
fi

# The maintainer scripts try to start services; with no systemd (containers, CI runners)
# invoke-rc.d would fail or start daemons with the packaged config. policy-rc.d exit 101
# forbids that for the duration of the install only.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    created_policy=1
fi
cleanup() {
    if [[ $created_policy -eq 1 ]]; then
        $sudo rm -f "$policy"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${packages[@]}"

have_all || { echo "slurm-setup: binaries still missing after install" >&2; exit 1; }
echo "slurm-setup: installed ${packages[*]}"
