#!/usr/bin/env bash
# A real single-node SLURM with accounting, for tests and for trying the launcher locally.
#
#   slurm/local_cluster.sh start    install (if missing) and start everything; no-op when up
#   slurm/local_cluster.sh stop     cancel jobs, stop every daemon this script started
#   slurm/local_cluster.sh status   print what is up (exit 0 only when all daemons are up)
#
# Needs root and, the first time, apt-get (Debian/Ubuntu). Everything it writes lives under
# $SIREN_SLURM_DIR (default /tmp/siren-slurm): configs, MariaDB data, munge key and socket,
# logs, pid files. Nothing under /etc is touched, so it coexists with a system install as long
# as the SLURM ports (6817-6819) are free. Client commands need the config path:
#
#   export SLURM_CONF=/tmp/siren-slurm/etc/slurm.conf    (status prints it)
#
# Environment: SIREN_SLURM_DIR, SIREN_SLURM_TIMEOUT (seconds to wait for readiness, default 60),
# SIREN_SLURM_DB_PORT (port of the private MariaDB on 127.0.0.1, default 3310).
set -euo pipefail

STATE_DIR="${SIREN_SLURM_DIR:-/tmp/siren-slurm}"
TIMEOUT="${SIREN_SLURM_TIMEOUT:-60}"
DB_PORT="${SIREN_SLURM_DB_PORT:-3310}"
# Numbers only: both are expanded in arithmetic and configs.
[[ "$TIMEOUT" =~ ^[0-9]+$ && "$DB_PORT" =~ ^[0-9]+$ ]] || {
  echo "error: SIREN_SLURM_TIMEOUT and SIREN_SLURM_DB_PORT must be whole numbers" >&2; exit 2; }
# This script runs as root and kills the pids its state folder lists: a folder another user made first (the
# default is under /tmp) could make it kill any process or run their configs. Only one of our own is used.
own_state_dir() {
  if [[ -e "$STATE_DIR" && ( ! -O "$STATE_DIR" || -L "$STATE_DIR" ) ]]; then
    echo "error: $STATE_DIR is not a folder of this user's (owner $(stat -c %U "$STATE_DIR")); remove it or set" \
         "SIREN_SLURM_DIR to a folder of your own" >&2
    exit 2
  fi
}
own_state_dir
CLUSTER=siren
ACCOUNT=siren
PARTITION=debug
NODE=localhost

ETC="$STATE_DIR/etc"
LOG="$STATE_DIR/log"
RUN="$STATE_DIR/run"
DB_DIR="$STATE_DIR/mysql"
MUNGE_KEY="$ETC/munge.key"
MUNGE_SOCKET="$RUN/munge.socket"
DB_SOCKET="$RUN/mysqld.sock"
export SLURM_CONF="$ETC/slurm.conf"

# Start order (cmd_stop stops them in waves, the other way round).
DAEMONS=(mariadb munged slurmdbd slurmctld slurmd)
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
BINARIES=(slurmctld slurmd slurmdbd munged mariadbd mariadb-install-db sacctmgr sacct sinfo)

die() {
    echo "local_cluster: error: $*" >&2
    exit 1
}
say() { echo "local_cluster: $*"; }

pidfile() { echo "$RUN/$1.pid"; }

is_up() {
    local pid comm
    pid="$(cat "$(pidfile "$1")" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    # a stale pidfile whose number now belongs to another process: that one is not ours to stop
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    case "$1" in
        mariadb) [[ "$comm" == mariadbd || "$comm" == mysqld ]] ;;
        *) [[ "$comm" == "$1" ]] ;;
    esac
}

install_packages() {
    local missing=()
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null || missing+=("$b")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # Package scripts would start system-wide munge/mariadb/slurm services with /etc configs;
    # a policy-rc.d that answers 101 forbids that (it is how Docker images do it).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        made_policy=1
    fi
    local ok=1
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
    } >"$LOG/apt.log" 2>&1 || ok=0
    if ((made_policy)); then rm -f "$policy"; fi
    ((ok)) || die "apt-get install failed, see $LOG/apt.log"
}

write_configs() {
    local cpus mem_mb db_pass
    cpus="$(nproc)"
    # slurmd drains a node whose RealMemory exceeds what it detects; leave 10% headroom.
    mem_mb="$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    # One password per state dir, kept so an existing database stays usable.
    [[ -s "$ETC/db.pass" ]] || (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$ETC/db.pass")
    db_pass="$(cat "$ETC/db.pass")"

    cat >"$ETC/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh; rewritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
# Daemons and jobs run as root: this is a throwaway test cluster on a root-only machine.
SlurmUser=root
SlurmdUser=root
# Private munged (own key and socket), so a system munge is neither needed nor disturbed.
# cred_expire also delays the restart of a requeued job (default 120 s, +1): keep it short.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
# linuxproc tracks job processes by parent pid: no cgroup tree needed (containers rarely
# delegate one), hence no cgroup.conf. task/none: no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Schedule cores, not whole nodes, so several 1-CPU jobs (array tasks) run side by side.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Pending jobs that become eligible later (a requeued job waits cred_expire) are otherwise
# picked up only by the periodic pass, every 60 s by default.
SchedulerParameters=sched_interval=1
# A node that was DOWN (e.g. slurmd restarted) comes back by itself once it registers.
ReturnToService=2
MpiDefault=none
# Default KillWait is 30 s: a cancelled/requeued job would hold the node COMPLETING that long.
KillWait=2
# submitit learns job states only from sacct, hence slurmdbd accounting.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
# Clients and slurmctld reach slurmdbd through this munge socket (AuthInfo is not used for it).
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# No mail on a test cluster (the default /bin/mail is usually absent).
MailProg=/bin/true
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# Sizes come from this machine; jobs asking for more are rejected at submission.
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

    (
        umask 077 # slurmdbd refuses a config readable by others (it holds the DB password)
        cat >"$ETC/slurmdbd.conf" <<EOF
# Written by slurm/local_cluster.sh; rewritten on every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$NODE
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$LOG/slurmdbd.log
# Private MariaDB over TCP on 127.0.0.1 (a socket path cannot be given to slurmdbd).
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOF
    )
}

# Polls "$@" until it succeeds or TIMEOUT passes; $what names the step for the error.
wait_for() {
    local what="$1" logs="$2"
    shift 2
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for $what; see $logs"
        sleep 0.2
    done
}

start_mariadb() {
    if [[ ! -d "$DB_DIR/mysql" ]]; then
        mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR" \
            >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed, see $LOG/mariadb-install.log"
    fi
    # mariadbd does not daemonize: detach it from this shell so it outlives the script.
    setsid mariadbd --no-defaults --user=root --datadir="$DB_DIR" --socket="$DB_SOCKET" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
        --pid-file="$(pidfile mariadb)" --log-error="$LOG/mariadb.log" </dev/null >/dev/null 2>&1 &
    wait_for "MariaDB" "$LOG/mariadb.log" mariadb --no-defaults --socket="$DB_SOCKET" -u root -e 'SELECT 1'
    # Root logs in through the socket (unix_socket auth); slurmdbd needs a TCP user.
    mariadb --no-defaults --socket="$DB_SOCKET" -u root <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$ETC/db.pass")';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_munged() {
    if [[ ! -s "$MUNGE_KEY" ]]; then
        (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
    fi
    # --force: munged refuses a socket under a world-writable /tmp parent otherwise.
    munged --force --key-file="$MUNGE_KEY" --socket="$MUNGE_SOCKET" --pid-file="$(pidfile munged)" \
        --log-file="$LOG/munged.log" --seed-file="$RUN/munged.seed" ||
        die "munged failed, see $LOG/munged.log"
}

start_slurmdbd() {
    slurmdbd || die "slurmdbd failed, see $LOG/slurmdbd.log"
    wait_for "slurmdbd" "$LOG/slurmdbd.log" sacctmgr -n show cluster
}

# sacct answers only for a cluster known to slurmdbd; the account lets profiles name one.
register_cluster() {
    local -a q=(sacctmgr -i -n -P)
    [[ -n "$("${q[@]}" show cluster "$CLUSTER" format=cluster)" ]] ||
        "${q[@]}" add cluster "$CLUSTER" >/dev/null
    [[ -n "$("${q[@]}" show account "$ACCOUNT" format=account)" ]] ||
        "${q[@]}" add account "$ACCOUNT" cluster="$CLUSTER" description=siren organization=siren >/dev/null
    [[ -n "$("${q[@]}" show user root format=user)" ]] ||
        "${q[@]}" add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
}

start_slurmctld() {
    slurmctld -f "$SLURM_CONF" || die "slurmctld failed, see $LOG/slurmctld.log"
}

start_slurmd() {
    # The machine's hostname is not "localhost"; -N makes slurmd serve the configured node.
    slurmd -f "$SLURM_CONF" -N "$NODE" || die "slurmd failed, see $LOG/slurmd.log"
}

node_idle() { [[ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" == idle* ]]; }

# A node drained in an earlier session (e.g. "Kill task failed" when a job outlived its kill)
# keeps that state across restarts; on this single-node test cluster, put it back in service.
resume_drained_node() {
    local state
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    if [[ "$state" == drain* || "$state" == down* ]]; then
        say "node $NODE was $state ($(sinfo -h -R -n "$NODE" -o %E 2>/dev/null)); resuming it"
        scontrol update nodename="$NODE" state=resume
    fi
}

cmd_start() {
    local d down=0
    [[ $EUID -eq 0 ]] || die "must run as root (SlurmUser=root, and it installs packages)"
    mkdir -p "$STATE_DIR"
    own_state_dir  # again: another user could have made it since the check above (mkdir -p takes theirs)
    mkdir -p "$ETC" "$LOG" "$RUN" "$DB_DIR" "$STATE_DIR/ctld" "$STATE_DIR/spool"
    for d in "${DAEMONS[@]}"; do is_up "$d" || down=1; done
    if ((!down)); then
        say "already running (state in $STATE_DIR)"
        return 0
    fi
    install_packages
    write_configs
    local t0=$SECONDS
    for d in "${DAEMONS[@]}"; do
        is_up "$d" || "start_$d"
        if [[ "$d" == slurmdbd ]]; then register_cluster; fi # before slurmctld connects
    done
    wait_for "slurmctld to answer" "$LOG/slurmctld.log" sinfo -h
    resume_drained_node
    wait_for "node $NODE to be idle (sinfo)" "$LOG/slurmctld.log and $LOG/slurmd.log" node_idle
    wait_for "sacct" "$LOG/slurmdbd.log" sacct -n -X
    say "up in $((SECONDS - t0))s: partition $PARTITION, $(nproc) CPUs; export SLURM_CONF=$SLURM_CONF"
}

# Sends SIGTERM to the given daemons together and waits for all of them (each takes ~2 s).
stop_together() {
    local d pid pids=()
    for d in "$@"; do
        is_up "$d" || continue
        pid="$(cat "$(pidfile "$d")")"
        kill "$pid"
        pids+=("$d:$pid")
    done
    for _ in $(seq 50); do
        local alive=0
        for d in "${pids[@]}"; do kill -0 "${d#*:}" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.2
    done
    for d in "${pids[@]}"; do
        if kill -0 "${d#*:}" 2>/dev/null; then
            say "${d%%:*} (${d#*:}) ignored SIGTERM for 10 s; killing it"
            kill -9 "${d#*:}"
        fi
        rm -f "$(pidfile "${d%%:*}")"
        say "stopped ${d%%:*}"
    done
}

cmd_stop() {
    local d any=0
    for d in "${DAEMONS[@]}"; do is_up "$d" && any=1; done
    if ((!any)); then
        say "nothing running (state in $STATE_DIR)"
        return 0
    fi
    if is_up slurmctld; then
        # Jobs would outlive slurmd as orphaned slurmstepd processes.
        scancel --full --partition="$PARTITION" 2>/dev/null || true
    fi
    # In waves, so slurmctld can still hand its last records to slurmdbd, and slurmdbd its
    # writes to MariaDB; munged serves them all until the end.
    stop_together slurmd slurmctld
    stop_together slurmdbd
    stop_together munged mariadb
}

cmd_status() {
    local d all=0
    for d in "${DAEMONS[@]}"; do
        if is_up "$d"; then
            printf '%-10s up (pid %s)\n' "$d" "$(cat "$(pidfile "$d")")"
        else
            printf '%-10s down\n' "$d"
            all=1
        fi
    done
    if is_up slurmctld; then sinfo; fi
    echo "export SLURM_CONF=$SLURM_CONF"
    return "$all"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status   (state dir: $STATE_DIR)" >&2
    exit 2
    ;;
esac
