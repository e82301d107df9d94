#!/usr/bin/env bash
# A real Slurm (with slurmdbd + MariaDB accounting) on this machine, for the end-to-end tests and for trying the
# launcher on a workstation: one node (this machine), and with --nodes N also N more nodes for multi-node jobs, each
# a slurmd in its own network and UTS namespace. Debian/Ubuntu only; needs root; works without systemd or cgroups.
# See docs/local-slurm.md.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $(basename "$0") up [--nodes N] | down | status

  up       install the Debian packages if missing, write the configs, start munged, mariadbd, slurmdbd,
           slurmctld and slurmd, and wait until the node is idle. Safe to run again: running daemons are kept.
  up --nodes N
           the same, plus N nodes ${VNODE_PREFIX}1..${VNODE_PREFIX}N for multi-node jobs (partition 'multi', 2 <= N <= $MAX_VNODES):
           each a slurmd in its own network namespace (veth on bridge $BRIDGE, private /24 ${SUBNET}.0/24)
           and UTS namespace (hostname ${VNODE_PREFIX}I). N=1 is the plain single-node cluster. Without --nodes,
           'up' keeps the count of the last 'up' (default 1). Changing it needs 'down' first.
  down     stop the daemons that 'up' started (slurmd(s), slurmctld, slurmdbd, mariadbd, munged), by their pid
           files; remove the namespaces, veth pairs, bridge and /etc/hosts lines of the extra nodes.
           State (job history, accounting database, logs) stays in the state directory.
  status   show which daemons run and 'sinfo'; exit 0 only if jobs can be submitted and run on every node.

Environment:
  LAUNCHER_SLURM_STATE_DIR  state directory (pid files, logs, spool, database); default /var/lib/launcher-slurm
  LAUNCHER_SLURM_DB_PORT    TCP port of the private MariaDB on 127.0.0.1; default 3306
  LAUNCHER_SLURM_TIMEOUT    seconds 'up' waits for the nodes to become idle; default 60
  LAUNCHER_SLURM_NODES      the N of --nodes (LOCAL_SLURM_NODES is read too); --nodes wins
  LAUNCHER_SLURM_SUBNET     first three octets of the extra nodes' private /24; default 10.254.18
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
# iproute2: ss (port checks) and ip (the extra nodes' namespaces, veth pairs and bridge).
readonly PACKAGES=(slurm-wlm munge slurmdbd mariadb-server iproute2)

readonly RUN_DIR=$STATE_DIR/run
readonly LOG_DIR=$STATE_DIR/log
readonly DB_DIR=$STATE_DIR/mysql
readonly DB_SOCKET=$RUN_DIR/mysql/mysqld.sock
readonly DB_PASSWORD_FILE=$STATE_DIR/db_password
NODE=$(hostname -s)
readonly NODE

# Extra nodes for multi-node jobs (up --nodes N). The machine's own name resolves to 127.0.0.1, which a network
# namespace cannot reach, so this machine's node cannot share an allocation with them: the extra nodes are all in
# namespaces of their own, alike, and the partition 'multi' spans them. Only the addresses below are ever used:
# SUBNET.1 on the bridge (slurmctld, this machine's slurmd), SUBNET.(10+I) in the namespace of node I.
readonly MAX_VNODES=4
readonly VNODE_PREFIX=vnode
readonly SUBNET=${LAUNCHER_SLURM_SUBNET:-10.254.18}
readonly BRIDGE=lslurm-br
readonly HOST_ADDR=$SUBNET.1
readonly NODES_FILE=$STATE_DIR/nodes
readonly HOSTS_FILE=/etc/hosts
readonly HOSTS_BEGIN="# BEGIN nodes of scripts/local_slurm.sh (removed by its 'down')"
readonly HOSTS_END="# END nodes of scripts/local_slurm.sh"
NODES=1  # N of --nodes: how many nodes a multi-node job may span (1: none; set by resolve_nodes)
VNODES=() # the extra nodes' names when NODES > 1

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

# pid_file DAEMON: DAEMON is a program name, or slurmd@NODE for the slurmd of one node when there are several
# (SlurmdPidFile with %n). A single-node cluster keeps the plain slurmd.pid of earlier versions of this script.
pid_file() {
    case $1 in
        munged) echo "$RUN_DIR/munge/munged.pid" ;;
        mariadbd) echo "$RUN_DIR/mysql/mariadbd.pid" ;;
        slurmd@*) echo "$RUN_DIR/slurmd-${1#slurmd@}.pid" ;;
        *) echo "$RUN_DIR/$1.pid" ;;
    esac
}

log_file() {
    case $1 in
        slurmd@*) echo "$LOG_DIR/slurmd-${1#slurmd@}.log" ;;
        *) echo "$LOG_DIR/$1.log" ;;
    esac
}

# The slurmd daemons of the configuration in force: "slurmd" alone, or slurmd@NODE for this machine and each extra node.
slurmd_daemons() {
    local n
    if ((${#VNODES[@]} == 0)); then
        echo slurmd
        return
    fi
    echo "slurmd@$NODE"
    for n in "${VNODES[@]}"; do echo "slurmd@$n"; done
}

# Every slurmd pid file present, whatever configuration wrote it (what 'down' and 'status' look at).
slurmd_daemons_present() {
    local f
    [[ -f $RUN_DIR/slurmd.pid ]] && echo slurmd
    for f in "$RUN_DIR"/slurmd-*.pid; do
        [[ -f $f ]] || continue
        f=${f##*/slurmd-}
        echo "slurmd@${f%.pid}"
    done
}

# Print the pid of daemon $1 if its pid file names a live process with that name; a stale pid file is removed.
# Checking the process name guards against a pid reused by an unrelated process after a crash or reboot.
daemon_pid() {
    local name=${1%@*} file pid comm
    file=$(pid_file "$1")
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    if [[ $pid =~ ^[0-9]+$ ]] && comm=$(cat "/proc/$pid/comm" 2>/dev/null) && [[ $comm == "$name" ]]; then
        echo "$pid"
        return 0
    fi
    # Only clean up while holding the lock (up/down); `status` just reports. (stderr: callers capture stdout.)
    if [[ ${HAVE_LOCK:-0} -eq 1 ]]; then
        log "$1: removing stale pid file $file (pid ${pid:-?} is not running $name)" >&2
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
    local mem_kb real_mb addr=127.0.0.1 slurmd_files=slurmd i
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    # Leave 5% for the OS and the daemons; with config_overrides slurmd does not check it anyway.
    real_mb=$((mem_kb * 95 / 100 / 1024))
    if ((${#VNODES[@]} > 0)); then
        # The namespaces reach this machine only at the bridge's address; every slurmd writes files of its own.
        addr=$HOST_ADDR
        slurmd_files=slurmd-%n
    fi
    cat <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$NODE($addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits until the previous launch credential expires (default 120 s) before it may start again.
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/spool/slurmctld
SlurmdSpoolDir=$STATE_DIR/spool/$slurmd_files
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$RUN_DIR/$slurmd_files.pid
SlurmctldLogFile=$(log_file slurmctld)
SlurmdLogFile=$LOG_DIR/$slurmd_files.log
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
AccountingStorageHost=$addr
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
# Advertise 4 CPUs on a 2-core machine so that 2-task jobs and a preempting job fit at the same time.
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=$addr CPUs=4 RealMemory=$real_mb State=UNKNOWN
EOF
    for i in "${!VNODES[@]}"; do
        echo "NodeName=${VNODES[i]} NodeAddr=$(vnode_addr $((i + 1))) CPUs=4 RealMemory=$real_mb State=UNKNOWN"
    done
    cat <<EOF
PartitionName=DEFAULT Nodes=$NODE State=UP OverSubscribe=NO
# MaxTime in minutes. GraceTime (seconds) is what a preempted job gets between its signal and SIGTERM.
PartitionName=debug Default=YES MaxTime=30 PriorityTier=1 GraceTime=10
PartitionName=dev MaxTime=60 MaxNodes=1 PriorityTier=1 GraceTime=10
PartitionName=prod MaxTime=1-00:00:00 PriorityTier=1 GraceTime=10
PartitionName=urgent MaxTime=60 PriorityTier=10 PreemptMode=OFF
EOF
    if ((${#VNODES[@]} > 0)); then
        # The extra nodes only: these jobs never share a node with the single-node partitions' (nor meet urgent's).
        echo "PartitionName=multi Nodes=${VNODE_PREFIX}[1-${#VNODES[@]}] MaxTime=60 PriorityTier=1 GraceTime=10"
    fi
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

# ------------------------------------------------------------------------------------------------------ extra nodes

# Node I of the extra nodes (1-based): its address, and the names of its network namespace and of the host end of
# its veth pair (at most 15 characters: lslurm-vnode4 has 13). Inside its namespace the other end is called eth0.
vnode_addr() { echo "$SUBNET.$((10 + $1))"; }
vnode_netns() { echo "lslurm-$1"; }
vnode_veth() { echo "lslurm-$1"; }
readonly VNODE_NAME_RE="^lslurm-${VNODE_PREFIX}[0-9]+\$"

set_nodes() {
    local i
    NODES=$1
    VNODES=()
    if ((NODES > 1)); then
        for ((i = 1; i <= NODES; i++)); do VNODES+=("$VNODE_PREFIX$i"); done
    fi
}

# The N for 'up': --nodes, else LAUNCHER_SLURM_NODES / LOCAL_SLURM_NODES, else the last 'up's, else 1.
resolve_nodes() {
    local n=${1:-${LAUNCHER_SLURM_NODES:-${LOCAL_SLURM_NODES:-}}}
    if [[ -z $n && -s $NODES_FILE ]]; then
        n=$(<"$NODES_FILE")
    fi
    n=${n:-1}
    [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= MAX_VNODES)) || die "--nodes takes 1 to $MAX_VNODES (got '$n')"
    set_nodes "$((10#$n))"
}

# The node count the state directory records (what the configuration on disk was written for).
recorded_nodes() {
    local n=1
    [[ -s $NODES_FILE ]] && n=$(<"$NODES_FILE")
    [[ $n =~ ^[0-9]+$ ]] || n=1
    echo "$((10#$n))"
}

set_no_ipv6() {
    # Our links carry IPv4 on our /24 only: no IPv6 link-local addresses, router solicitations or MLD reports.
    local netns=$1 dev=$2
    if [[ -z $netns ]]; then
        echo 1 >"/proc/sys/net/ipv6/conf/$dev/disable_ipv6" 2>/dev/null || true
    else
        nsenter --net="/run/netns/$netns" sh -c "echo 1 >/proc/sys/net/ipv6/conf/$dev/disable_ipv6" 2>/dev/null || true
    fi
}

# Refuse a subnet that is not private, or that this machine already routes or uses (other than on our bridge).
check_subnet() {
    local other octet
    [[ $SUBNET =~ ^(10\.[0-9]{1,3}|172\.(1[6-9]|2[0-9]|3[01])|192\.168)\.[0-9]{1,3}$ ]] ||
        die "LAUNCHER_SLURM_SUBNET=$SUBNET: give the first three octets of a private /24 (10.X.Y, 172.16-31.Y or 192.168.Y)"
    for octet in ${SUBNET//./ }; do
        ((10#$octet <= 255)) || die "LAUNCHER_SLURM_SUBNET=$SUBNET is not an address"
    done
    other=$({
        ip -4 route show match "$SUBNET.0/24"
        ip -4 route show root "$SUBNET.0/24"
    } 2>/dev/null | grep -v '^default ' | grep -vw "dev $BRIDGE" | sort -u || true)
    [[ -z $other ]] || die "the extra nodes' subnet $SUBNET.0/24 overlaps a route of this machine (choose another with LAUNCHER_SLURM_SUBNET):
$other"
}

# The bridge that joins this machine (SUBNET.1) and the namespaces' veth pairs. A bridge (not routing) lets the
# namespaces reach each other without turning on IP forwarding; no route leaves the /24.
setup_bridge() {
    local have
    check_subnet
    if ! ip link show dev "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge || die "could not create the bridge $BRIDGE (ip link add ... type bridge)"
        log "network: created bridge $BRIDGE"
    fi
    set_no_ipv6 "" "$BRIDGE"
    have=$(ip -4 -o addr show dev "$BRIDGE" | awk '{print $4}' | tr '\n' ' ')
    if [[ $have != "$HOST_ADDR/24 " ]]; then
        ip -4 addr flush dev "$BRIDGE"
        ip addr add "$HOST_ADDR/24" dev "$BRIDGE" || die "could not give $BRIDGE the address $HOST_ADDR/24"
    fi
    ip link set "$BRIDGE" up
}

# Node I's namespace, veth pair (host end on the bridge, eth0 inside) and address. Idempotent.
setup_vnode_net() {
    local i=$1 name=$2 netns veth addr have
    netns=$(vnode_netns "$name")
    veth=$(vnode_veth "$name")
    addr=$(vnode_addr "$i")
    [[ -e /run/netns/$netns ]] || ip netns add "$netns" || die "ip netns add $netns failed"
    if ! ip -n "$netns" link show dev eth0 >/dev/null 2>&1 || ! ip link show dev "$veth" >/dev/null 2>&1; then
        ip link del "$veth" >/dev/null 2>&1 || true
        ip link add "$veth" type veth peer name eth0 netns "$netns" ||
            die "could not create the veth pair $veth (host) / eth0 (namespace $netns)"
    fi
    set_no_ipv6 "" "$veth"
    set_no_ipv6 "$netns" eth0
    ip link set "$veth" master "$BRIDGE" up || die "could not attach $veth to $BRIDGE"
    have=$(ip -n "$netns" -4 -o addr show dev eth0 | awk '{print $4}' | tr '\n' ' ')
    if [[ $have != "$addr/24 " ]]; then
        ip -n "$netns" -4 addr flush dev eth0
        ip -n "$netns" addr add "$addr/24" dev eth0 || die "could not give eth0 in $netns the address $addr/24"
    fi
    ip -n "$netns" link set lo up
    ip -n "$netns" link set eth0 up
}

# /etc/hosts without our block, then our block (when there are extra nodes). Node names must resolve on every node
# (MASTER_ADDR is the first node's name; gloo binds to the address its own hostname resolves to).
render_hosts() {
    local i
    awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1; next} $0 == e {skip = 0; next} !skip' "$HOSTS_FILE"
    if ((${#VNODES[@]} > 0)); then
        echo "$HOSTS_BEGIN"
        for i in "${!VNODES[@]}"; do printf '%s\t%s\n' "$(vnode_addr $((i + 1)))" "${VNODES[i]}"; done
        echo "$HOSTS_END"
    fi
}

update_hosts() {
    local tmp i want got
    tmp=$(mktemp)
    render_hosts >"$tmp"
    if ! cmp -s "$tmp" "$HOSTS_FILE"; then
        # In place, not mv: /etc/hosts is often a bind mount in containers.
        cat "$tmp" >"$HOSTS_FILE"
        if ((${#VNODES[@]} > 0)); then
            log "network: $HOSTS_FILE maps ${VNODES[*]} to $(vnode_addr 1)..$(vnode_addr ${#VNODES[@]})"
        else
            log "network: removed the extra nodes' lines from $HOSTS_FILE"
        fi
    fi
    rm -f "$tmp"
    for i in "${!VNODES[@]}"; do
        want=$(vnode_addr $((i + 1)))
        got=$(getent ahostsv4 "${VNODES[i]}" | awk 'NR == 1 {print $1}')
        [[ $got == "$want" ]] || warn "${VNODES[i]} resolves to ${got:-nothing}, not $want (another line in $HOSTS_FILE?)"
    done
}

# The namespace's processes once its slurmd is gone (job steps, tasks): TERM, 10 s, KILL. Only our namespaces.
end_netns_processes() {
    local netns=$1 pids deadline
    pids=$(ip netns pids "$netns" 2>/dev/null | tr '\n' ' ')
    [[ -n ${pids// /} ]] || return 0
    warn "namespace $netns: ending what still runs there (job steps): pids $pids"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while [[ -n $(ip netns pids "$netns" 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.2; done
    pids=$(ip netns pids "$netns" 2>/dev/null | tr '\n' ' ')
    # shellcheck disable=SC2086
    [[ -z ${pids// /} ]] || kill -KILL $pids 2>/dev/null || true
}

# The extra nodes whose namespaces exist (by name), comma-separated.
present_vnodes() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "$VNODE_NAME_RE" | sed 's/^lslurm-//' | paste -sd, - || true
}

no_jobs_on() { [[ -z $(timeout 10 squeue -h -w "$1" -o %i 2>/dev/null) ]]; }

# Jobs on the extra nodes cannot outlive the namespaces 'down' removes: cancel them first, so that slurmctld and
# sacct record their end (killing their processes alone leaves them RUNNING in slurmctld's view).
cancel_vnode_jobs() {
    local nodes ids
    nodes=$(present_vnodes)
    [[ -n $nodes ]] && daemon_pid slurmctld >/dev/null || return 0
    ids=$(timeout 10 squeue -h -w "$nodes" -o %i 2>/dev/null | sort -u | paste -sd' ' - || true)
    [[ -n $ids ]] || return 0
    warn "cancelling job(s) $ids on the extra nodes ($nodes): they cannot outlive the namespaces that 'down' removes"
    # shellcheck disable=SC2086
    scancel $ids || true
    wait_until 30 "the end of the cancelled jobs" no_jobs_on "$nodes" || true
}

# Namespaces of extra nodes that the configuration no longer has (left by an 'up' with a larger --nodes that was
# not followed by 'down'), and the bridge when there are no extra nodes. Called only while no slurmd runs.
remove_unwanted_vnodes() {
    local netns want=" ${VNODES[*]} "
    for netns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "$VNODE_NAME_RE" || true); do
        [[ $want == *" ${netns#lslurm-} "* ]] && continue
        end_netns_processes "$netns"
        ip netns del "$netns" && log "network: removed namespace $netns (not in --nodes $NODES)"
    done
    if ((${#VNODES[@]} == 0)) && ip link show dev "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE" && log "network: removed bridge $BRIDGE (no extra nodes)"
    fi
}

# Everything of the extra nodes that is left, found by name: namespaces, veth pairs, the bridge, /etc/hosts lines.
teardown_vnodes() {
    local netns link
    for netns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "$VNODE_NAME_RE" || true); do
        end_netns_processes "$netns"
        ip netns del "$netns" && log "network: removed namespace $netns"
    done
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print $2}' | grep -E "$VNODE_NAME_RE" || true); do
        ip link del "$link" 2>/dev/null && log "network: removed veth $link"
    done
    if ip link show dev "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE" && log "network: removed bridge $BRIDGE"
    fi
    VNODES=()
    update_hosts
}

# munged's socket is a file: a slurmd in another network namespace authenticates through the same munged.
check_munge_in_netns() {
    nsenter --net="/run/netns/$1" sh -c 'munge -n </dev/null | unmunge >/dev/null' 2>/dev/null ||
        die "munge does not work inside the network namespace $1 (munged's socket must be reachable)"
}

start_vnode_slurmd() {
    local name=$1 netns pid
    netns=$(vnode_netns "$name")
    if pid=$(daemon_pid "slurmd@$name"); then
        log "slurmd@$name: already running (pid $pid)"
        return
    fi
    check_munge_in_netns "$netns"
    # nsenter, not 'ip netns exec': that remounts /sys and slurmd then fails ("No filesystem mounted on
    # /sys/fs/cgroup"). The UTS namespace gives it its own hostname, from which slurmd takes its NodeName.
    if ! nsenter --net="/run/netns/$netns" unshare --uts sh -c 'hostname "$1" && exec slurmd' sh "$name" 9>&-; then
        show_log_tail "slurmd@$name"
        die "slurmd of $name failed to start"
    fi
    wait_until 10 "slurmd@$name pid file" daemon_pid "slurmd@$name" || {
        show_log_tail "slurmd@$name"
        die "slurmd of $name exited right after starting"
    }
    log "slurmd@$name: started (pid $(daemon_pid "slurmd@$name"), namespace $netns, address $(vnode_addr "${name#"$VNODE_PREFIX"}"))"
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
    local daemon=$1 port=$2 name=${1%@*} pid
    if pid=$(daemon_pid "$daemon"); then
        log "$daemon: already running (pid $pid)"
        return
    fi
    check_port_free "$port" "$name"
    # Both daemonize themselves and write their pid file.
    if ! "$name" 9>&-; then
        show_log_tail "$daemon"
        die "$daemon failed to start"
    fi
    wait_until 10 "$daemon pid file" daemon_pid "$daemon" || {
        show_log_tail "$daemon"
        die "$daemon exited right after starting"
    }
    log "$daemon: started (pid $(daemon_pid "$daemon"))"
}

# A node's state as sinfo sees it ("idle", "mixed", "down*", ...); empty if slurmctld does not answer.
node_state() { { timeout 10 sinfo -h -n "$1" -o %T 2>/dev/null || true; } | awk 'NR == 1'; }

node_usable() {
    case $(node_state "$1") in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

all_nodes() { printf '%s\n' "$NODE" "${VNODES[@]}"; }

all_nodes_usable() {
    local n
    for n in $(all_nodes); do node_usable "$n" || return 1; done
}

# wait_node_idle NODE LOG_DAEMON: until NODE is usable; LOG_DAEMON's log is shown if it never is.
wait_node_idle() {
    local node=$1 daemon=$2 deadline=$((SECONDS + UP_TIMEOUT)) next_report=$((SECONDS + 5)) state resumed=0
    while :; do
        state=$(node_state "$node")
        case $state in
            idle | mixed | allocated | completing) return 0 ;;
            drain* | down)
                # slurmd answers but the node was left drained/down (e.g. by a crash): clear it once.
                if ((resumed == 0)); then
                    log "node $node is $state ($(timeout 10 sinfo -h -n "$node" -o %E 2>/dev/null || true)); resuming it"
                    scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
        if ((SECONDS >= deadline)); then
            show_log_tail slurmctld
            show_log_tail "$daemon"
            die "node $node not idle after ${UP_TIMEOUT}s (state: ${state:-slurmctld not answering})"
        fi
        if ((SECONDS >= next_report)); then
            log "waiting for node $node to become idle (state: ${state:-slurmctld not answering yet})"
            next_report=$((SECONDS + 5))
        fi
        sleep 0.5
    done
}

all_daemons_running() {
    local d
    for d in mariadbd slurmdbd slurmctld $(slurmd_daemons); do
        daemon_pid "$d" >/dev/null || return 1
    done
    daemon_pid munged >/dev/null || munge_works
}

# Any Slurm daemon of ours running, whatever configuration started it.
slurm_daemons_running() {
    local d
    for d in slurmctld $(slurmd_daemons_present); do
        daemon_pid "$d" >/dev/null && return 0
    done
    return 1
}

seconds_since() { awk -v us=$(($(now_us) - $1)) 'BEGIN { printf "%.1f", us / 1e6 }'; }

# ---------------------------------------------------------------------------------------------------------- commands

cmd_up() {
    local start changed=0 prev vstart i n
    require_root up
    start=$(now_us)
    mkdir -p "$STATE_DIR"
    lock_state
    resolve_nodes "${ARG_NODES:-}"
    prev=$(recorded_nodes)
    if ((prev != NODES)) && slurm_daemons_running; then
        die "the cluster is up with --nodes $prev; to change to --nodes $NODES run '$(basename "$0") down' first"
    fi
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/spool/slurmctld" "$STATE_DIR/spool/slurmd"
    if ((${#VNODES[@]} > 0)); then
        for n in $(all_nodes); do mkdir -p "$STATE_DIR/spool/slurmd-$n"; done
    fi
    install_packages
    write_configs && changed=1
    echo "$NODES" >"$NODES_FILE"
    update_hosts
    if all_daemons_running && all_nodes_usable; then
        if ((changed)); then
            warn "the configuration changed while the cluster was up; run 'down' then 'up' to apply it"
            warn "(a reconfigure requeues running jobs, so this script does not do it by itself)"
        fi
        log "already up: all daemons running, $(for n in $(all_nodes); do printf 'node %s %s, ' "$n" "$(node_state "$n")"; done | sed 's/, $//')"
        return 0
    fi
    slurm_daemons_running || remove_unwanted_vnodes
    # First: with extra nodes, every client (sacctmgr included) reaches slurmctld and slurmdbd at the bridge's address.
    ((${#VNODES[@]} == 0)) || setup_bridge
    start_munged
    start_mariadbd
    start_slurmdbd
    register_cluster
    start_slurm_daemon slurmctld 6817
    if ((${#VNODES[@]} == 0)); then
        start_slurm_daemon slurmd 6818
    else
        start_slurm_daemon "slurmd@$NODE" 6818
    fi
    vstart=$(now_us)
    for i in "${!VNODES[@]}"; do
        setup_vnode_net $((i + 1)) "${VNODES[i]}"
        start_vnode_slurmd "${VNODES[i]}"
    done
    wait_node_idle "$NODE" "$(slurmd_daemons | head -n 1)"
    for n in "${VNODES[@]}"; do wait_node_idle "$n" "slurmd@$n"; done
    if ((${#VNODES[@]} > 0)); then
        log "extra nodes ${VNODES[*]} (partition multi) ready $(seconds_since "$vstart") s after their set-up began"
    fi
    log "up in $(seconds_since "$start") s: cluster $CLUSTER, $(for n in $(all_nodes); do printf 'node %s %s, ' "$n" "$(node_state "$n")"; done | sed 's/, $//')"
    timeout 10 sinfo || true
}

# stop_daemon NAME...: SIGTERM to each, then wait for each (SIGKILL after 30 s). Several names are stopped together
# (the slurmds of several nodes); different daemons are stopped one call after another.
stop_daemon() {
    local name pid deadline names=() pids=() i
    for name in "$@"; do
        if ! pid=$(daemon_pid "$name"); then
            log "$name: not running (or not started by this script)"
            continue
        fi
        kill -TERM "$pid" 2>/dev/null || true
        names+=("$name")
        pids+=("$pid")
    done
    # Wait on the pid, not the pid file: slurmctld removes its pid file before it has exited.
    deadline=$((SECONDS + 30))
    for i in "${!pids[@]}"; do
        name=${names[i]}
        pid=${pids[i]}
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
    done
}

cmd_down() {
    local running d slurmds
    require_root down
    [[ -d $STATE_DIR ]] || {
        log "nothing to stop: $STATE_DIR does not exist"
        teardown_vnodes
        return 0
    }
    lock_state
    cancel_vnode_jobs
    if daemon_pid slurmctld >/dev/null; then
        running=$(timeout 10 squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null | wc -l || true)
        if ((running > 0)); then
            warn "$running job(s) still running: their processes survive slurmd and 'up' reattaches them (scancel first to end them)"
        fi
    fi
    slurmds=$(slurmd_daemons_present)
    # shellcheck disable=SC2086
    stop_daemon ${slurmds:-slurmd}
    for d in slurmctld slurmdbd mariadbd munged; do
        stop_daemon "$d"
    done
    teardown_vnodes
}

cmd_status() {
    local d pid rc=0 state n netns
    set_nodes "$(recorded_nodes)"
    for d in munged mariadbd slurmdbd slurmctld $(slurmd_daemons); do
        if pid=$(daemon_pid "$d"); then
            printf '%-16s running (pid %s)\n' "$d" "$pid"
        elif [[ $d == munged ]] && command -v munge >/dev/null && munge_works; then
            printf '%-16s running (not started by this script)\n' "$d"
        elif [[ -f $(pid_file "$d") ]]; then
            printf '%-16s stopped (stale pid file %s)\n' "$d" "$(pid_file "$d")"
            rc=1
        else
            printf '%-16s stopped\n' "$d"
            rc=1
        fi
    done
    for n in "${VNODES[@]}"; do
        netns=$(vnode_netns "$n")
        if [[ -e /run/netns/$netns ]]; then
            printf '%-16s namespace %s, eth0 %s\n' "$n" "$netns" \
                "$(ip -n "$netns" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}' || true)"
        else
            printf '%-16s no namespace %s\n' "$n" "$netns"
            rc=1
        fi
    done
    if [[ ! -f $SLURM_CONF ]] || ! command -v sinfo >/dev/null; then
        echo "no Slurm configuration: run '$(basename "$0") up'"
        return 1
    fi
    echo
    timeout 10 sinfo 2>&1 || rc=1
    for n in $(all_nodes); do
        if ! node_usable "$n"; then
            state=$(node_state "$n")
            echo
            echo "node $n is not usable (state: ${state:-slurmctld not answering}$(
                [[ $state == drain* ]] && printf '; reason: %s' "$(timeout 10 sinfo -h -n "$n" -o %E 2>/dev/null)"
            ))"
            rc=1
        fi
    done
    return "$rc"
}

main() {
    local cmd=${1:-}
    (($# >= 1)) || {
        usage >&2
        exit 2
    }
    shift
    ARG_NODES=
    while (($# > 0)); do
        case $cmd:$1 in
            up:--nodes) (($# >= 2)) || die "--nodes needs a number"; ARG_NODES=$2; shift 2 ;;
            up:--nodes=*) ARG_NODES=${1#--nodes=}; shift ;;
            *)
                usage >&2
                exit 2
                ;;
        esac
    done
    case $cmd in
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
