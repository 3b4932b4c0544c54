#!/usr/bin/env bash
# Idempotent single-host SLURM cluster for development and tests (Debian bookworm slurm-wlm 22.05).
#
# usage: cluster/slurm.sh start|stop|restart|status|conf|env|logs [nodes]
#   nodes = 1 -> one slurmd named "localhost"; N > 1 -> slurmd n1..nN on this host (NodeAddr=127.0.0.1)
#
# env (all optional):
#   SLURM_BASE     state folder (conf, pids, logs, spool, state)   default: <repo>/.slurm
#   AUTH           none | munge                                     default: none (no munged needed)
#   CTLD_PORT      slurmctld port; slurmd i listens on CTLD_PORT+i  default: 6817
#   CPUS_PER_NODE  CPUs each node declares (may exceed nproc)       default: 4
#   MEM_MB         RealMemory per node                              default: 80% of RAM / nodes, >= 4096
#   CRED_EXPIRE    AuthInfo cred_expire (also the requeue delay)    default: 10
#   SLURM_NODES    node count when [nodes] is omitted               default: last used, else 1
#   KEEP_JOBS=1    stop/restart without cancelling queued/running jobs first
#   START_TIMEOUT  seconds to wait for all nodes to be idle         default: 30
#
# Clients (sinfo, srun, sbatch, submitit) find the cluster via:  eval "$(cluster/slurm.sh env)"
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CMD=${1:-status}
BASE=$(realpath -m "${SLURM_BASE:-$ROOT/.slurm}")
CONF=$BASE/etc/slurm.conf
AUTH=${AUTH:-none}
CTLD_PORT=${CTLD_PORT:-6817}
CPUS=${CPUS_PER_NODE:-4}
CRED_EXPIRE=${CRED_EXPIRE:-10}
START_TIMEOUT=${START_TIMEOUT:-30}
SBIN=/usr/sbin
export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/usr/bin

if [ -n "${2:-}" ]; then NODES=$2
elif [ -n "${SLURM_NODES:-}" ]; then NODES=$SLURM_NODES
elif [ -f "$BASE/etc/nodes" ]; then NODES=$(cat "$BASE/etc/nodes")
else NODES=1; fi
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "slurm.sh: bad node count '$NODES'" >&2; exit 2; }
case "$AUTH" in none|munge) ;; *) echo "slurm.sh: AUTH must be none or munge" >&2; exit 2 ;; esac
MEM_MB=${MEM_MB:-$(awk -v n="$NODES" '/MemTotal/{m=int($2/1024/n*0.8); if (m<4096) m=4096; print m}' /proc/meminfo)}

log() { echo "slurm.sh: $*" >&2; }
node_names() { if [ "$NODES" = 1 ]; then echo localhost; else seq -f 'n%g' 1 "$NODES"; fi; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
ctld_alive() { alive "$BASE/run/slurmctld.pid"; }
any_alive() { local f; for f in "$BASE"/run/slurmctld.pid "$BASE"/run/slurmd-*.pid; do alive "$f" && return 0; done; return 1; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
log_tails() { local f; for f in "$BASE"/log/*.log; do [ -f "$f" ] && { echo "==> $f <==" >&2; tail -n 15 "$f" >&2; }; done; return 0; }

render_conf() {  # the full slurm.conf on stdout
  sed -e "s|@CLUSTER_NAME@|${CLUSTER_NAME:-spnet}|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
      -e "s|@USER@|$(id -un)|g" -e "s|@AUTH@|$AUTH|g" -e "s|@CRED_EXPIRE@|$CRED_EXPIRE|g" \
      -e "s|@BASE@|$BASE|g" "$HERE/slurm.conf.in"
  local port=$((CTLD_PORT + 1)) n
  for n in $(node_names); do
    echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
    port=$((port + 1))
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

write_conf() {
  mkdir -p "$BASE"/{etc,state,run,log,spool}
  [ -f "$BASE/.gitignore" ] || echo '*' > "$BASE/.gitignore"   # the state folder ignores itself in git
  render_conf > "$CONF.new"
  if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.new"; then rm -f "$CONF.new"; else mv "$CONF.new" "$CONF"; fi
  echo "$NODES" > "$BASE/etc/nodes"
}

start_munge() {
  [ "$AUTH" = munge ] || return 0
  if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  if [ ! -f /etc/munge/munge.key ]; then
    mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  runuser -u munge -- "$SBIN/munged"
  cp /run/munge/munged.pid "$BASE/run/munged.pid"   # remember that *we* started it
  munge -n </dev/null | unmunge >/dev/null
}

nodes_ready() {  # true when slurmctld + every slurmd are alive and sinfo shows all nodes usable
  ctld_alive || return 1
  local n; for n in $(node_names); do alive "$BASE/run/slurmd-$n.pid" || return 1; done
  local ready; ready=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c -E ' (idle|mix|alloc)$' || true)
  [ "$ready" -ge "$NODES" ]
}

start() {
  local t0; t0=$(date +%s.%N)
  if any_alive; then
    if [ -f "$CONF" ] && ! render_conf | cmp -s "$CONF" -; then
      log "a cluster is already running in $BASE with a different configuration"
      log "(node count, CTLD_PORT, AUTH, CPUS_PER_NODE, ...); use: $0 restart $NODES, or stop it first"
      exit 1
    fi
    if nodes_ready; then
      echo "already running ($NODES node(s), $BASE)"; echo "export SLURM_CONF=$CONF"; return 0
    fi
  fi
  write_conf
  local port=$CTLD_PORT n
  # check every port first so that a clash does not leave half a cluster running
  ctld_alive || ! port_busy "$port" || { log "port $port (slurmctld) is in use by another process; set CTLD_PORT"; exit 1; }
  for n in $(node_names); do
    port=$((port + 1))
    alive "$BASE/run/slurmd-$n.pid" || ! port_busy "$port" || { log "port $port (slurmd $n) is in use by another process; set CTLD_PORT"; exit 1; }
  done
  start_munge
  if ! ctld_alive; then
    "$SBIN/slurmctld" -f "$CONF" || { log "slurmctld failed to start; log tails:"; log_tails; exit 1; }
  fi
  for n in $(node_names); do
    mkdir -p "$BASE/spool/$n"
    if ! alive "$BASE/run/slurmd-$n.pid"; then
      "$SBIN/slurmd" -f "$CONF" -N "$n" || { log "slurmd $n failed to start; log tails:"; log_tails; exit 1; }
    fi
  done
  local deadline=$((SECONDS + START_TIMEOUT))
  until nodes_ready; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "cluster failed to start within ${START_TIMEOUT}s; log tails:"
      log_tails; sinfo -N >&2 2>&1 || true
      exit 1
    fi
    sleep 0.2
  done
  sinfo -N
  echo "cluster up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}') s ($NODES node(s), $BASE)"
  echo "export SLURM_CONF=$CONF"
}

cancel_jobs() {
  [ "${KEEP_JOBS:-0}" = 1 ] && return 0
  ctld_alive || return 0
  local ids; ids=$(squeue -h -o %i 2>/dev/null || true)
  [ -n "$ids" ] || return 0
  # shellcheck disable=SC2086
  scancel $ids 2>/dev/null || true
  local i; for i in $(seq 1 50); do   # KillWait=5: steps are SIGKILLed after 5 s
    [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.2
  done
}

stop() {
  cancel_jobs
  local f p i pids=()
  for f in "$BASE"/run/slurmd-*.pid "$BASE/run/slurmctld.pid"; do   # SIGTERM all daemons, then wait for all
    [ -f "$f" ] || continue
    p=$(cat "$f")
    if kill -0 "$p" 2>/dev/null; then kill "$p" 2>/dev/null || true; pids+=("$p"); fi
  done
  for i in $(seq 1 100); do   # up to 10 s, then SIGKILL
    local left=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
    [ $left = 0 ] && break; sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -f "$BASE"/run/slurmd-*.pid "$BASE/run/slurmctld.pid"
  if [ "${STOP_MUNGE:-1}" = 1 ] && [ -f "$BASE/run/munged.pid" ]; then   # only a munged this script started
    kill "$(cat "$BASE/run/munged.pid")" 2>/dev/null || true; rm -f "$BASE/run/munged.pid"
  fi
  echo "stopped ($BASE)"
}

status() {
  local f rc=0
  echo "base: $BASE"; echo "export SLURM_CONF=$CONF"
  if [ ! -f "$CONF" ]; then echo "not configured"; return 3; fi
  for f in "$BASE"/run/slurmctld.pid "$BASE"/run/slurmd-*.pid; do
    [ -f "$f" ] || continue
    if alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): dead"; fi
  done
  if nodes_ready; then sinfo -N; squeue; else echo "cluster is not (fully) up"; rc=3; fi
  return $rc
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  conf) render_conf ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  logs) log_tails 2>&1 ;;
  -h|--help|help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "usage: $0 start|stop|restart|status|conf|env|logs [nodes]" >&2; exit 2 ;;
esac
