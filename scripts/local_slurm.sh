#!/usr/bin/env bash
# A real single-node Slurm (with slurmdbd + MariaDB accounting) on this machine, for the end-to-end tests and for
# trying the launcher on a workstation. Debian/Ubuntu only; needs root; works without systemd or cgroups.
# See docs/local-slurm.md.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $(basename "$0") up|down|status

  up       install the Debian packages if missing, write the configs, start munged, mariadbd, slurmdbd,
           slurmctld and slurmd, and wait until the node is idle. Safe to run again: running daemons are kept.
  down     stop the daemons that 'up' started (slurmd, slurmctld, slurmdbd, mariadbd, munged), by their pid files.
           State (job history, accounting database, logs) stays in the state directory.
  status   show which daemons run and 'sinfo'; exit 0 only if jobs can be submitted and run.

Environment:
  LAUNCHER_SLURM_STATE_DIR  state directory (pid files, logs, spool, database); default /var/lib/launcher-slurm
  LAUNCHER_SLURM_DB_PORT    TCP port of the private MariaDB on 127.0.0.1; default 3306
  LAUNCHER_SLURM_TIMEOUT    seconds 'up' waits for the node to become idle; default 60
EOF
}

readonly STATE_DIR=${LAUNCHER_SLURM_STATE_DIR:-/var/lib/launcher-slurm}
readonly DB_PORT=${LAUNCHER_SLURM_DB_PORT:-3306}
readonly UP_TIMEOUT=${LAUNCHER_SLURM_TIMEOUT:-60}
readonly CLUSTER=launcher
readonly CONF_DIR=/etc/slurm            # where Debian's Slurm commands look, so plain `sinfo`/`sbatch` work
readonly SLURM_CONF=$CONF_DIR/slurm.conf
readonly DBD_CONF=$CONF_DIR/slurmdbd.conf
readonly MARKER="# Written by scripts/local_slurm.sh; edits are overwritten by 'up'."
readonly PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)

readonly RUN_DIR=$STATE_DIR/run
readonly LOG_DIR=$STATE_DIR/log
readonly DB_DIR=$STATE_DIR/mysql
readonly DB_SOCKET=$RUN_DIR/mysql/mysqld.sock
readonly DB_PASSWORD_FILE=$STATE_DIR/db_password
NODE=$(hostname -s)
readonly NODE

log() { printf 'local_slurm: %s\n' "$*"; }
warn() { printf 'local_slurm: warning: %s\n' "$*" >&2; }
die() {
    printf 'local_slurm: error: %s\n' "$*" >&2
    exit 1
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' needs root (it installs packages and starts system daemons); run it with sudo"
}

# Microseconds since the epoch, for timing `up`.
now_us() { echo "${EPOCHREALTIME/./}"; }

pid_file() {
    case $1 in
        munged) echo "$RUN_DIR/munge/munged.pid" ;;
        mariadbd) echo "$RUN_DIR/mysql/mariadbd.pid" ;;
        *) echo "$RUN_DIR/$1.pid" ;;
    esac
}

log_file() { echo "$LOG_DIR/$1.log"; }

# Print the pid of daemon $1 if its pid file names a live process with that name; a stale pid file is removed.
# Checking the process name guards against a pid reused by an unrelated process after a crash or reboot.
daemon_pid() {
    local name=$1 file pid comm
    file=$(pid_file "$name")
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    if [[ $pid =~ ^[0-9]+$ ]] && comm=$(cat "/proc/$pid/comm" 2>/dev/null) && [[ $comm == "$name" ]]; then
        echo "$pid"
        return 0
    fi
    # Only clean up while holding the lock (up/down); `status` just reports. (stderr: callers capture stdout.)
    if [[ ${HAVE_LOCK:-0} -eq 1 ]]; then
        log "$name: removing stale pid file $file (pid ${pid:-?} is not running $name)" >&2
        rm -f "$file"
    fi
    return 1
}

show_log_tail() {
    local file
    file=$(log_file "$1")
    if [[ -s $file ]]; then
        printf -- '--- last lines of %s ---\n' "$file" >&2
        tail -n 25 "$file" >&2
        printf -- '---\n' >&2
    fi
}

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND (quietly) until it succeeds or the time is up.
wait_until() {
    local timeout=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || {
            warn "$what: not ready after ${timeout}s"
            return 1
        }
        sleep 0.2
    done
}

# Fail early, with the culprit, when a port we need belongs to something else (another Slurm, a system MariaDB).
check_port_free() {
    local port=$1 who=$2 owner
    owner=$(ss -Hltnp "sport = :$port" 2>/dev/null || true)
    [[ -z $owner ]] || die "port $port, needed by $who, is already in use (stop that service first):
$owner"
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

# Serializes up/down. Every daemon is started with `9>&-`: a daemon that inherited fd 9 would hold the lock forever.
lock_state() {
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/lock"
    flock -w 120 9 || die "another '$(basename "$0")' is still running (lock $STATE_DIR/lock)"
    HAVE_LOCK=1
}

# --------------------------------------------------------------------------------------------------------- packages

install_packages() {
    local missing=() pkg status
    for pkg in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        [[ $status == "install ok installed" ]] || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "packages ${missing[*]} are missing and there is no apt-get (Debian/Ubuntu only)"
    log "installing ${missing[*]} (apt-get; output in $LOG_DIR/apt.log)"
    # The packages' own service start-up fails or is denied without systemd; harmless, we start the daemons below.
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
        >"$LOG_DIR/apt.log" 2>&1; then
        tail -n 25 "$LOG_DIR/apt.log" >&2
        die "apt-get failed (full output in $LOG_DIR/apt.log)"
    fi
}

# ---------------------------------------------------------------------------------------------------------- configs

render_slurm_conf() {
    local mem_kb real_mb
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    # Leave 5% for the OS and the daemons; with config_overrides slurmd does not check it anyway.
    real_mb=$((mem_kb * 95 / 100 / 1024))
    cat <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits until the previous launch credential expires (default 120 s) before it may start again.
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/spool/slurmctld
SlurmdSpoolDir=$STATE_DIR/spool/slurmd
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
SlurmctldLogFile=$(log_file slurmctld)
SlurmdLogFile=$(log_file slurmd)
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
# No cgroups here (containers, gVisor): track processes through /proc and do no CPU/memory binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Bring the node back by itself after slurmd restarts (down/up) instead of leaving it DOWN.
ReturnToService=2
# Keep finished jobs in "scontrol show job" for 10 min (tests inspect them after the fact).
MinJobAge=600
# Reject impossible requests at submission; otherwise they pend forever (and an srun blocks its shell).
EnforcePartLimits=ALL
SchedulerType=sched/backfill
# Schedule within a second or two of a submission, requeue or preemption instead of up to a minute.
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Jobs in a partition of a higher PriorityTier requeue jobs of lower tiers; the victim gets its --signal right away
# (preempt_send_user_signal), then GraceTime seconds, then SIGTERM/SIGKILL and the requeue.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
# Accounting through slurmdbd: sacct (and so submitit's job states) needs it.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
# Advertise 4 CPUs on a 2-core machine so that 2-task jobs and a preempting job fit at the same time.
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=4 RealMemory=$real_mb State=UNKNOWN
PartitionName=DEFAULT Nodes=$NODE State=UP OverSubscribe=NO
# MaxTime in minutes. GraceTime (seconds) is what a preempted job gets between its signal and SIGTERM.
PartitionName=debug Default=YES MaxTime=30 PriorityTier=1 GraceTime=10
PartitionName=dev MaxTime=60 MaxNodes=1 PriorityTier=1 GraceTime=10
PartitionName=prod MaxTime=1-00:00:00 PriorityTier=1 GraceTime=10
PartitionName=urgent MaxTime=60 PriorityTier=10 PreemptMode=OFF
EOF
}

render_slurmdbd_conf() {
    cat <<EOF
$MARKER
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$NODE
DbdPort=6819
SlurmUser=root
PidFile=$(pid_file slurmdbd)
LogFile=$(log_file slurmdbd)
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(<"$DB_PASSWORD_FILE")
StorageLoc=slurm_acct_db
EOF
}

# install_conf FILE MODE RENDER_FUNCTION: write FILE only if its content changes; refuse to overwrite a foreign file.
# Returns 0 if the file changed.
install_conf() {
    local file=$1 mode=$2 render=$3 tmp
    if [[ -e $file ]] && ! grep -qxF "$MARKER" "$file"; then
        die "$file exists and was not written by this script; move it away (it would be overwritten)"
    fi
    tmp=$(mktemp "$file.XXXXXX")
    "$render" >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -e $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$file"
}

write_configs() {
    local changed=1
    mkdir -p "$CONF_DIR"
    if [[ ! -s $DB_PASSWORD_FILE ]]; then
        (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASSWORD_FILE")
    fi
    install_conf "$SLURM_CONF" 0644 render_slurm_conf && changed=0
    # slurmdbd refuses a config that others can read (it holds the DB password); owner root = SlurmUser.
    install_conf "$DBD_CONF" 0600 render_slurmdbd_conf && changed=0
    return "$changed"
}

# ---------------------------------------------------------------------------------------------------------- daemons

start_munged() {
    local pid
    if pid=$(daemon_pid munged); then
        log "munged: already running (pid $pid)"
        return
    fi
    if munge_works; then
        # A munged we did not start (e.g. the system's): use it, and leave it alone in `down`.
        log "munged: using the munged already running (not started by this script)"
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "munged: creating /etc/munge/munge.key"
        (umask 077 && head -c 1024 /dev/urandom >/etc/munge/munge.key)
    fi
    # munged refuses to start unless the key and its directories belong to the munge user and are private.
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge "$RUN_DIR/munge"
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    [[ -e $(log_file munged) ]] || install -o munge -g munge -m 0640 /dev/null "$(log_file munged)"
    if ! runuser -u munge -- /usr/sbin/munged --pid-file="$(pid_file munged)" --log-file="$(log_file munged)" 9>&-; then
        show_log_tail munged
        die "munged failed to start"
    fi
    wait_until 10 munged munge_works || {
        show_log_tail munged
        die "munged started but 'munge -n | unmunge' fails"
    }
    log "munged: started (pid $(daemon_pid munged))"
}

start_mariadbd() {
    local pid pw
    if pid=$(daemon_pid mariadbd); then
        log "mariadbd: already running (pid $pid)"
    else
        check_port_free "$DB_PORT" "mariadbd (set LAUNCHER_SLURM_DB_PORT to use another port)"
        if [[ ! -d $DB_DIR/mysql ]]; then
            log "mariadbd: creating the database in $DB_DIR"
            install -d -o mysql -g mysql -m 0750 "$DB_DIR"
            if ! mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" --skip-test-db \
                --auth-root-authentication-method=socket >"$(log_file mariadb-install-db)" 2>&1; then
                show_log_tail mariadb-install-db
                die "mariadb-install-db failed"
            fi
        fi
        install -d -o mysql -g mysql -m 0755 "$RUN_DIR/mysql"
        [[ -e $(log_file mariadbd) ]] || install -o mysql -g mysql -m 0640 /dev/null "$(log_file mariadbd)"
        # --no-defaults: a private instance, independent of /etc/mysql (and of any system MariaDB).
        # setsid -f: mariadbd does not daemonize itself; detach it from this shell and its session.
        # innodb-lock-wait-timeout=900 is what slurmdbd asks for (it logs a warning otherwise).
        setsid -f mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" --socket="$DB_SOCKET" \
            --pid-file="$(pid_file mariadbd)" --log-error="$(log_file mariadbd)" \
            --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve --innodb-lock-wait-timeout=900 \
            </dev/null >>"$(log_file mariadbd)" 2>&1 9>&-
        wait_until 30 mariadbd mariadb-admin --no-defaults --socket="$DB_SOCKET" -uroot ping || {
            show_log_tail mariadbd
            die "mariadbd did not come up"
        }
        wait_until 5 "mariadbd pid file" daemon_pid mariadbd || die "mariadbd runs but wrote no pid file"
        log "mariadbd: started (pid $(daemon_pid mariadbd))"
    fi
    # Idempotent; also re-syncs the password if the password file was regenerated.
    pw=$(<"$DB_PASSWORD_FILE")
    mariadb --no-defaults --socket="$DB_SOCKET" -uroot <<EOF || die "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

sacctmgr_works() { sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
    local pid
    if pid=$(daemon_pid slurmdbd); then
        log "slurmdbd: already running (pid $pid)"
        return
    fi
    check_port_free 6819 slurmdbd
    if ! slurmdbd 9>&-; then
        show_log_tail slurmdbd
        die "slurmdbd failed to start"
    fi
    # The first start creates the tables, which takes a few seconds.
    wait_until 60 slurmdbd sacctmgr_works || {
        show_log_tail slurmdbd
        die "slurmdbd does not answer sacctmgr"
    }
    log "slurmdbd: started (pid $(daemon_pid slurmdbd))"
}

# The cluster and root's association must exist in the database, or slurmctld's jobs are not accounted.
register_cluster() {
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
        log "sacctmgr: registering cluster $CLUSTER"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
    fi
    if [[ -z $(sacctmgr -n -P list assoc cluster="$CLUSTER" account=root user=root format=user) ]]; then
        log "sacctmgr: adding user root to account root"
        sacctmgr -i add user root account=root cluster="$CLUSTER" >/dev/null || die "sacctmgr add user root failed"
    fi
}

start_slurm_daemon() {
    local name=$1 port=$2 pid
    if pid=$(daemon_pid "$name"); then
        log "$name: already running (pid $pid)"
        return
    fi
    check_port_free "$port" "$name"
    # Both daemonize themselves and write their pid file.
    if ! "$name" 9>&-; then
        show_log_tail "$name"
        die "$name failed to start"
    fi
    wait_until 10 "$name pid file" daemon_pid "$name" || {
        show_log_tail "$name"
        die "$name exited right after starting"
    }
    log "$name: started (pid $(daemon_pid "$name"))"
}

# The node's state as sinfo sees it ("idle", "mixed", "down*", ...); empty if slurmctld does not answer.
node_state() { { timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null || true; } | awk 'NR == 1'; }

node_usable() {
    case $(node_state) in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

wait_node_idle() {
    local deadline=$((SECONDS + UP_TIMEOUT)) next_report=$((SECONDS + 5)) state resumed=0
    while :; do
        state=$(node_state)
        case $state in
            idle | mixed | allocated | completing) return 0 ;;
            drain* | down)
                # slurmd answers but the node was left drained/down (e.g. by a crash): clear it once.
                if ((resumed == 0)); then
                    log "node $NODE is $state ($(timeout 10 sinfo -h -n "$NODE" -o %E 2>/dev/null || true)); resuming it"
                    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
        if ((SECONDS >= deadline)); then
            show_log_tail slurmctld
            show_log_tail slurmd
            die "node $NODE not idle after ${UP_TIMEOUT}s (state: ${state:-slurmctld not answering})"
        fi
        if ((SECONDS >= next_report)); then
            log "waiting for node $NODE to become idle (state: ${state:-slurmctld not answering yet})"
            next_report=$((SECONDS + 5))
        fi
        sleep 0.5
    done
}

all_daemons_running() {
    local d
    for d in mariadbd slurmdbd slurmctld slurmd; do
        daemon_pid "$d" >/dev/null || return 1
    done
    daemon_pid munged >/dev/null || munge_works
}

# ---------------------------------------------------------------------------------------------------------- commands

cmd_up() {
    local start changed=0
    require_root up
    start=$(now_us)
    mkdir -p "$STATE_DIR"
    lock_state
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/spool/slurmctld" "$STATE_DIR/spool/slurmd"
    install_packages
    write_configs && changed=1
    if all_daemons_running && node_usable; then
        if ((changed)); then
            warn "the configuration changed while the cluster was up; run 'down' then 'up' to apply it"
            warn "(a reconfigure requeues running jobs, so this script does not do it by itself)"
        fi
        log "already up: all daemons running, node $NODE $(node_state)"
        return 0
    fi
    start_munged
    start_mariadbd
    start_slurmdbd
    register_cluster
    start_slurm_daemon slurmctld 6817
    start_slurm_daemon slurmd 6818
    wait_node_idle
    log "up in $(awk -v us=$(($(now_us) - start)) 'BEGIN { printf "%.1f", us / 1e6 }') s: cluster $CLUSTER, node $NODE $(node_state)"
    timeout 10 sinfo || true
}

stop_daemon() {
    local name=$1 pid deadline
    if ! pid=$(daemon_pid "$name"); then
        log "$name: not running (or not started by this script)"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    # Wait on the pid, not the pid file: slurmctld removes its pid file before it has exited.
    deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            warn "$name (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
    done
    rm -f "$(pid_file "$name")"
    log "$name: stopped (pid $pid)"
}

cmd_down() {
    local running d
    require_root down
    [[ -d $STATE_DIR ]] || {
        log "nothing to stop: $STATE_DIR does not exist"
        return 0
    }
    lock_state
    if daemon_pid slurmctld >/dev/null; then
        running=$(timeout 10 squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null | wc -l || true)
        if ((running > 0)); then
            warn "$running job(s) still running: their processes survive slurmd; 'up' reattaches them (scancel first to end them)"
        fi
    fi
    for d in slurmd slurmctld slurmdbd mariadbd munged; do
        stop_daemon "$d"
    done
}

cmd_status() {
    local d pid rc=0 state
    for d in munged mariadbd slurmdbd slurmctld slurmd; do
        if pid=$(daemon_pid "$d"); then
            printf '%-10s running (pid %s)\n' "$d" "$pid"
        elif [[ $d == munged ]] && command -v munge >/dev/null && munge_works; then
            printf '%-10s running (not started by this script)\n' "$d"
        elif [[ -f $(pid_file "$d") ]]; then
            printf '%-10s stopped (stale pid file %s)\n' "$d" "$(pid_file "$d")"
            rc=1
        else
            printf '%-10s stopped\n' "$d"
            rc=1
        fi
    done
    if [[ ! -f $SLURM_CONF ]] || ! command -v sinfo >/dev/null; then
        echo "no Slurm configuration: run '$(basename "$0") up'"
        return 1
    fi
    echo
    timeout 10 sinfo 2>&1 || rc=1
    state=$(node_state)
    if ! node_usable; then
        echo
        echo "node $NODE is not usable (state: ${state:-slurmctld not answering})"
        rc=1
    fi
    return "$rc"
}

main() {
    (($# == 1)) || {
        usage >&2
        exit 2
    }
    case $1 in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        -h | --help | help) usage ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
