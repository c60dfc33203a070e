#!/usr/bin/env bash
# Starts a one-node SLURM cluster on this machine: munged, slurmctld, slurmd (no systemd needed),
# with the slurm.conf of make_slurm_conf.sh written to /etc/slurm/slurm.conf. About 2-5 s.
# usage: cluster/start_slurm.sh [--clean] [PARTITION]     (as root; stop with stop_slurm.sh)
#   --clean    forget earlier jobs (slurmctld -c) and empty the job-completion log
# The daemons this script started are listed in /run/slurm/histomap-started; stop_slurm.sh stops
# exactly those, by the PIDs in their pid files. An already running munged is reused (and left
# running); a slurm.conf that this project did not write is never overwritten.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
HERE=$(cd "$(dirname "$0")" && pwd)
CLEAN=0
if [ "${1:-}" = "--clean" ]; then CLEAN=1; shift; fi
PARTITION=${1:-local}
CONF=/etc/slurm/slurm.conf
MARKER="# written by histomap cluster/make_slurm_conf.sh"
STARTED=/run/slurm/histomap-started

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
waitfor() { # SECONDS COMMAND...: retry COMMAND every 0.2 s until it succeeds
  local n=$(( $1 * 5 )); shift
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "start_slurm.sh: timed out waiting for: $*" >&2
  return 1
}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || { echo "start_slurm.sh: must run as root" >&2; exit 1; }
for exe in slurmctld slurmd munged sinfo; do
  command -v "$exe" >/dev/null ||
    { echo "start_slurm.sh: $exe missing: run install_slurm.sh" >&2; exit 1; }
done
if alive /run/slurm/slurmctld.pid || alive /run/slurm/slurmd.pid; then
  echo "start_slurm.sh: slurmctld/slurmd already running; stop them first (stop_slurm.sh)" >&2
  exit 1
fi
if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF" && [ "${HISTOMAP_SLURM_FORCE:-0}" != 1 ]; then
  echo "start_slurm.sh: $CONF was not written by this project; not overwriting it" \
       "(set HISTOMAP_SLURM_FORCE=1 to replace it)" >&2
  exit 1
fi

mkdir -p /etc/slurm /run/munge /run/slurm /var/log/slurm /var/lib/slurm/slurmctld \
         /var/lib/slurm/slurmd
chown munge:munge /run/munge && chmod 755 /run/munge
chown slurm:slurm /run/slurm /var/log/slurm /var/lib/slurm/slurmctld
"$HERE/make_slurm_conf.sh" "$PARTITION" > "$CONF"
: > "$STARTED"
if [ "$CLEAN" = 1 ]; then
  rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/*
  rm -f /var/log/slurm/jobcomp.log
fi

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  echo "munged already running: reusing it"
else
  if [ ! -s /etc/munge/munge.key ]; then   # Debian's postinst normally creates it
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  s=$(now)
  runuser -u munge -- munged
  echo "munged /run/munge/munged.pid" >> "$STARTED"
  waitfor 10 sh -c 'munge -n | unmunge'
  echo "munged up (pid $(cat /run/munge/munged.pid)) in $(since "$s") s"
fi

s=$(now)
if [ "$CLEAN" = 1 ]; then slurmctld -c; else slurmctld; fi
echo "slurmctld /run/slurm/slurmctld.pid" >> "$STARTED"
waitfor 30 sh -c 'scontrol ping | grep -q UP'
echo "slurmctld up (pid $(cat /run/slurm/slurmctld.pid)) in $(since "$s") s"

s=$(now)
slurmd
echo "slurmd /run/slurm/slurmd.pid" >> "$STARTED"
if ! waitfor 60 sh -c 'sinfo -h -o %T | grep -qx idle'; then
  scontrol show node >&2 || true
  tail -n 20 /var/log/slurm/slurmd.log >&2 || true
  exit 1
fi
echo "slurmd up, node idle (pid $(cat /run/slurm/slurmd.pid)) in $(since "$s") s"
sinfo -o "%P %a %D %c %m %T %N"
