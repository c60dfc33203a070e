#!/usr/bin/env bash
# Installs a one-node SLURM from the distribution's packages (Debian/Ubuntu: slurmctld, slurmd,
# slurm-client, munge) unless it is already installed. Daemons are not started by the packages:
# cluster/start_slurm.sh starts them. About 15-20 s on a fresh Debian 12.
# usage: cluster/install_slurm.sh          (as root; needs apt-get and a package mirror)
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
for exe in slurmctld slurmd sbatch squeue scontrol munged; do
  command -v "$exe" >/dev/null 2>&1 || missing+=("$exe")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "SLURM already installed: $(slurmctld -V), $(munged -V 2>&1 | head -1)"
  exit 0
fi
echo "missing: ${missing[*]}; installing SLURM packages"
if [ "$(id -u)" != 0 ]; then
  echo "install_slurm.sh: must run as root (apt-get)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: no apt-get; install slurmctld, slurmd, the SLURM client tools and" \
       "munge with your package manager" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "installed: $(slurmctld -V)"
