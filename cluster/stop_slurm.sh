#!/usr/bin/env bash
# Stops the daemons that start_slurm.sh started (listed in /run/slurm/histomap-started), by the
# PIDs in their pid files: first cancels the jobs still in the queue of that cluster, then
# slurmd, slurmctld and munged (munged only if start_slurm.sh started it). Safe to call twice.
# usage: cluster/stop_slurm.sh        (as root)
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
STARTED=/run/slurm/histomap-started

stop() { # NAME PIDFILE
  local name=$1 pidfile=$2 pid
  if [ ! -s "$pidfile" ]; then echo "$name: no pid file $pidfile"; return 0; fi
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "$name: pid $pid not running"; rm -f "$pidfile"; return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$name (pid $pid) still alive after 10 s: SIGKILL"
    kill -KILL "$pid"
  fi
  echo "$name (pid $pid) stopped"
  rm -f "$pidfile"
}

if [ ! -s "$STARTED" ]; then
  echo "stop_slurm.sh: nothing started by start_slurm.sh ($STARTED missing)"
  exit 0
fi
# jobs left by an interrupted run: cancel them by id while slurmctld still answers
if grep -q '^slurmctld ' "$STARTED" && scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs || true
    for _ in $(seq 1 50); do
      [ -z "$(squeue -h -t PD,R,CG -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi
for name in slurmd slurmctld munged; do
  pidfile=$(awk -v n="$name" '$1 == n {print $2}' "$STARTED")
  [ -n "$pidfile" ] && stop "$name" "$pidfile"
done
rm -f "$STARTED"
exit 0
