#!/usr/bin/env bash
# A throwaway one-node SLURM cluster (Debian 12, Slurm 22.05) for CI and tests, on machines
# without systemd. Every daemon runs in the foreground (-D/-F) in the background of this
# script and is stopped by its PID; nothing is installed as a service.
#
#   scripts/ci_slurm.sh install   apt-get update + install slurmctld slurmd slurm-client munge (root)
#   scripts/ci_slurm.sh start     write slurm.conf, start munged + slurmctld + slurmd, wait for node idle
#   scripts/ci_slurm.sh stop      scancel every job, stop every daemon started by `start`, by PID
#   scripts/ci_slurm.sh conf      only write $SLURM_CI_ROOT/etc/slurm.conf (to inspect it)
#
# Then `export SLURM_CONF=$SLURM_CI_ROOT/etc/slurm.conf`: sbatch/srun/squeue/scontrol need it.
#
# Knobs (environment):
#   SLURM_CI_ROOT          scratch folder for conf, state, logs, pid files (default /tmp/slurm-ci);
#                          wipe it before `start` for job ids from SLURM_CI_FIRST_JOB_ID again
#   SLURM_CI_CTLD_PORT     slurmctld port (default 6817)
#   SLURM_CI_SLURMD_PORT   slurmd port (default 6818)
#   SLURM_CI_FIRST_JOB_ID  first job id (default 1)
#   SLURM_CI_CPUS          CPUs of the node (default nproc; more than the machine has makes it INVALID)
#   SLURM_CI_APT_TIMEOUT   seconds allowed for each apt-get call (default 300)
#   SLURM_CI_START_TIMEOUT seconds to wait for the node to become idle (default 60; usually 1-2 s)
#
# Own munge socket and ports: two clusters (two CI jobs, two test sessions) can run side by side.
# No accounting (slurmdbd): sacct does not work; use `scontrol show job` within MinJobAge (300 s).
set -euo pipefail

ROOT=${SLURM_CI_ROOT:-/tmp/slurm-ci}
CTLD_PORT=${SLURM_CI_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_CI_SLURMD_PORT:-6818}
FIRST_JOB_ID=${SLURM_CI_FIRST_JOB_ID:-1}
CPUS=${SLURM_CI_CPUS:-$(nproc)}
APT_TIMEOUT=${SLURM_CI_APT_TIMEOUT:-300}
START_TIMEOUT=${SLURM_CI_START_TIMEOUT:-60}
export SLURM_CONF=$ROOT/etc/slurm.conf
RUN=$ROOT/run
LOG=$ROOT/log
MUNGE_DIR=$ROOT/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket

log() { echo "[ci_slurm] $*" >&2; }

# wait_for SECONDS CMD...: retry CMD every 0.2 s until it succeeds or time runs out.
wait_for() {
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 0.2
  done
}

# stop_pids NAME...: SIGTERM the PIDs in $RUN/NAME.pid all at once (each daemon takes 1.5-2 s to
# exit; in turn that added up to 6 s), wait up to 15 s for them, then SIGKILL what is left.
stop_pids() {
  local name p pids=()
  for name in "$@"; do
    [ -f "$RUN/$name.pid" ] || continue
    p=$(cat "$RUN/$name.pid")
    kill "$p" 2>/dev/null && pids+=("$name:$p")
  done
  local end=$((SECONDS + 15)) alive
  while :; do
    alive=()
    for name in "${pids[@]}"; do kill -0 "${name#*:}" 2>/dev/null && alive+=("$name"); done
    [ ${#alive[@]} -eq 0 ] && break
    if [ "$SECONDS" -ge "$end" ]; then
      for name in "${alive[@]}"; do log "SIGKILL ${name%%:*} (${name#*:})"; kill -9 "${name#*:}" 2>/dev/null || true; done
      break
    fi
    sleep 0.1
  done
  for name in "$@"; do rm -f "$RUN/$name.pid"; done
}

do_install() {
  if [ "$(id -u)" != 0 ]; then log "install needs root"; exit 1; fi
  # Wait for a dpkg lock held by someone else instead of failing at once.
  local apt=(timeout "$APT_TIMEOUT" apt-get -q -o DPkg::Lock::Timeout=120)
  "${apt[@]}" update
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends \
    slurmctld slurmd slurm-client munge
}

real_memory_mb() {  # 90 % of MemTotal: --mem requests are checked against it, so not tiny
  awk '/^MemTotal:/ {printf "%d\n", $2 / 1024 * 0.9}' /proc/meminfo
}

write_conf() {
  mkdir -p "$ROOT"/etc "$ROOT"/state "$ROOT"/spool "$RUN" "$LOG"
  cat >"$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
FirstJobId=$FIRST_JOB_ID
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$RUN/slurmctld.internal.pid
SlurmdPidFile=$RUN/slurmd.internal.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName=localhost CPUs=$CPUS RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}
# Why these lines: NodeName=localhost + `slurmd -N localhost` work whatever the hostname is;
# batch_sched_delay=0 cuts ~2 s off every sbatch; MailProg=/bin/true silences a config error;
# linuxproc/task none need no cgroups; the PMIx warnings in the logs are harmless (MpiDefault=none).

start_munged() {
  [ -f /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; }
  # munged refuses to run as root with the packaged key: run it as the munge user, with its
  # socket, pid, log and seed in our folder so a second cluster has its own.
  install -d -o munge -g munge -m 755 "$MUNGE_DIR"
  setpriv --reuid=munge --regid=munge --clear-groups \
    munged -F --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
    >"$LOG/munged.out" 2>&1 &
  echo $! >"$RUN/munged.pid"
  wait_for 20 sh -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" || {
    log "munged did not start:"; cat "$LOG/munged.out" "$MUNGE_DIR/munged.log" >&2 || true; return 1; }
}

do_start() {
  if [ -f "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; then
    log "a cluster is already running from $ROOT; run '$0 stop' first"; exit 1
  fi
  for b in munged slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || { log "$b not found: run '$0 install' (as root)"; exit 1; }
  done
  # Leave nothing half-started behind if any step fails.
  trap 'log "start failed; stopping what was started"; do_stop' ERR
  write_conf
  start_munged
  # -i: ignore any stale state in StateSaveLocation.
  slurmctld -D -i -f "$SLURM_CONF" >"$LOG/slurmctld.out" 2>&1 &
  echo $! >"$RUN/slurmctld.pid"
  slurmd -D -N localhost -f "$SLURM_CONF" >"$LOG/slurmd.out" 2>&1 &
  echo $! >"$RUN/slurmd.pid"
  wait_for "$START_TIMEOUT" sh -c '[ "$(sinfo -h -N -o %t)" = idle ]' || {
    log "node did not become idle:"; sinfo -N -l >&2 || true
    tail -n 20 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true; false; }
  trap - ERR
  log "node idle; export SLURM_CONF=$SLURM_CONF"
}

do_stop() {
  if [ -f "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; then
    scancel --user="$(id -un)" 2>/dev/null || true
    wait_for 20 sh -c '[ -z "$(squeue -h 2>/dev/null)" ]' || log "jobs still listed after scancel"
  fi
  # No job is left to clean up, so the daemons need not wait for each other.
  stop_pids slurmd slurmctld munged
}

case "${1:-}" in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  conf) write_conf; echo "$SLURM_CONF" ;;
  *) echo "usage: $0 install|start|stop|conf" >&2; exit 2 ;;
esac
