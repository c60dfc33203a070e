#!/bin/sh
# Writes a one-node slurm.conf for this machine to stdout: CPUs and memory read from the machine,
# no GPUs, one partition. Used by start_slurm.sh; the result is a test/workstation cluster, not
# a production configuration.
# usage: cluster/make_slurm_conf.sh [PARTITION]        (default partition name: local)
#
# Settings that matter for Snakemake's SLURM executor:
# - MinJobAge=600: finished jobs stay visible to `squeue --states=all` for 10 minutes. Without
#   slurmdbd (no accounting) `sacct` never reports jobs as finished, so the executor must poll
#   with `--slurm-status-command squeue`, which needs MinJobAge >= 120 s (3 x the status-check
#   interval) or finished jobs vanish before they are seen.
# - JobCompType=jobcomp/filetxt: one line per finished job (JobId, Name, JobState, ExitCode) in
#   /var/log/slurm/jobcomp.log, an independent record of what SLURM ran.
set -eu
PARTITION=${1:-local}
HOST=$(hostname)
CPUS=$(nproc)
MEM_TOTAL=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
MEM=$(( MEM_TOTAL > 2048 ? MEM_TOTAL - 1024 : MEM_TOTAL / 2 ))   # leave room for the daemons
cat <<CONF
# written by histomap cluster/make_slurm_conf.sh: one-node test cluster on ${HOST}
ClusterName=histomap
SlurmctldHost=${HOST}
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MpiDefault=none
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
