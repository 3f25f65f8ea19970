#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests and for trying kiln's Slurm path:
# slurmctld + slurmd on localhost from Debian's slurm-wlm, authenticated by munge.
#
#   slurm/local-cluster.sh start    # prints the SLURM_CONF to export for sbatch/squeue
#   slurm/local-cluster.sh status
#   slurm/local-cluster.sh stop     # stops only the daemons this script started, by pid
#
# State lives in $KILN_SLURM_DIR (default /tmp/kiln-slurm). Needs root and the packages
# slurm-wlm and munge (`apt-get install slurm-wlm munge`; .ci/run installs them).
set -euo pipefail

DIR="${KILN_SLURM_DIR:-/tmp/kiln-slurm}"
CONF="$DIR/slurm.conf"
PARTITION="${KILN_SLURM_PARTITION:-debug}"
CPUS="${KILN_SLURM_CPUS:-$(nproc)}"
MEMORY_MB="${KILN_SLURM_MEMORY_MB:-20000}"
NODE="$(hostname -s)"

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat > "$CONF" <<CONF
ClusterName=kiln-local
SlurmctldHost=$NODE
SlurmctldPort=${KILN_SLURMCTLD_PORT:-6817}
SlurmdPort=${KILN_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
DependencyParameters=kill_invalid_depend
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
DefMemPerCPU=$((MEMORY_MB / CPUS))
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
  if pid_alive "$DIR/munged.pid"; then return; fi
  if pgrep -x munged >/dev/null; then return; fi  # one munged serves every cluster on this host
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  rm -f /run/munge/munged.pid
  su -s /bin/sh munge -c "/usr/sbin/munged" || { echo "munged failed to start" >&2; exit 1; }
  # munged writes its pid where its user may write; keep a copy with the other daemons' pids
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$DIR/munged.pid"
}

wait_ready() {
  for _ in $(seq 100); do
    if SLURM_CONF="$CONF" sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then return 0; fi
    sleep 0.2
  done
  echo "slurm did not become ready; logs in $DIR/log" >&2
  return 1
}

case "${1:-}" in
  start)
    mkdir -p "$DIR"; chmod 0755 "$DIR"
    write_conf
    start_munge
    pid_alive "$DIR/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF" -i
    pid_alive "$DIR/slurmd.pid" || /usr/sbin/slurmd -f "$CONF"
    wait_ready
    echo "export SLURM_CONF=$CONF"
    ;;
  stop)
    for daemon in slurmd slurmctld munged; do
      if pid_alive "$DIR/$daemon.pid"; then
        pid="$(cat "$DIR/$daemon.pid")"; kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
      fi
      rm -f "$DIR/$daemon.pid"
    done
    ;;
  status)
    for daemon in munged slurmctld slurmd; do
      if pid_alive "$DIR/$daemon.pid"; then echo "$daemon running (pid $(cat "$DIR/$daemon.pid"))"
      else echo "$daemon stopped"; fi
    done
    [ -f "$CONF" ] && SLURM_CONF="$CONF" sinfo 2>/dev/null || true
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
