#!/usr/bin/env bash
# A throw-away Slurm cluster for the tests and CI: munged + slurmctld + slurmd, all as root, no systemd, no
# cgroup plugins, every file (key, sockets, state, spool, logs, pids) under one directory.
#
#   tools/slurm/cluster.sh install            # apt-get the Debian packages when sbatch/slurmctld are missing
#   tools/slurm/cluster.sh up DIR [NODES]     # start the daemons, wait for the node(s) to be idle
#   tools/slurm/cluster.sh down DIR           # cancel every job, stop exactly the processes `up` started
#   . DIR/env                                 # SLURM_CONF for sbatch/srun/squeue/scontrol
#   DIR/client COMMAND...                     # run a client there (sbatch, scontrol, trapo launch): NODES >= 2
#   tools/slurm/cluster.sh login-up DIR [NAME=VALUE ...]   # an sshd "login node" on 127.0.0.1 for `--ssh`
#   tools/slurm/cluster.sh login-down DIR     # stop it, drop its host key from /etc/ssh/ssh_known_hosts
#
# Environment: SLURM_NODE_CPUS (default: this machine's cores), SLURM_NODE_MEM_MB (default 20000),
# SLURM_PORT (slurmctld; slurmd uses SLURM_PORT + 1; default: two free ports; 6817 with NODES >= 2).
# Facts this relies on (Slurm 22.05, munge 0.5): the daemons daemonise and write their pid files; clients
# find the config through SLURM_CONF and munged through AuthInfo=socket=...; `scontrol requeue` needs
# cred_expire below the default 120 s to restart a job quickly; while a step runs, its slurmstepd keeps a
# socket NODE_JOB.STEP in the node's spool directory. MessageTimeout is 60 s, not 10: on a loaded machine a
# slurmd answered srun's kill of a failed step after 11 s, and slurmctld re-sent that kill a minute later,
# when it cancelled the requeued job's new step of the same id (seen in the 2-node tests).
#
# NODES >= 2: a real multi-node cluster on this machine, in network namespaces of its own named and addressed
# after DIR (trapo-<hash>-ctl, trapo-<hash>-n1 ...; 10.X.Y.0/24 exists only inside them and nothing leaves
# them: no default route). The controller's namespace holds a bridge (10.X.Y.1, host name ctl) that every
# node's namespace joins with a veth pair (eth0 inside, node nI at 10.X.Y.(10+I), host name nI). Each daemon
# runs with a private host name and a private /etc/hosts naming all of them (the job's processes inherit both
# from slurmd): that is what lets a plain torchrun rendezvous and gloo find the nodes. They start through
# nsenter + unshare, not `ip netns exec`, which remounts /sys and hides /sys/fs/cgroup from slurmd. munged
# stays here: its socket is a file path every namespace reaches. Slurm's paths must be absolute (with a
# relative conf slurmstepd retries for 60 s and srun reports "Socket timed out"). `down` ends exactly the
# processes inside these namespaces, then deletes them.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge openssh-server openssh-client rsync iproute2)
NODE=trapo-node
CTLD_HOST=ctl

die() { echo "cluster.sh: $*" >&2; exit 1; }

have_slurm() { command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v munged >/dev/null && command -v mungekey >/dev/null && [ -x /usr/sbin/sshd ] \
    && command -v ssh-keygen >/dev/null && command -v rsync >/dev/null && command -v ip >/dev/null \
    && command -v nsenter >/dev/null && command -v unshare >/dev/null; }

install() {
    have_slurm && return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
    [ "$(id -u)" = 0 ] || die "Slurm is not installed; installing it needs root (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null; } \
        || die "apt-get install ${PACKAGES[*]} failed"
    have_slurm || die "installed ${PACKAGES[*]} but the commands are still missing"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

write_conf() {  # write_conf DIR CPUS MEM CTLD_PORT SLURMD_PORT CTLD_HOST(ADDR) NODE=ADDR...
    local dir=$1 cpus=$2 mem=$3 ctld_port=$4 slurmd_port=$5 ctld=$6; shift 6
    local per_node="" node names=()
    [ $# -eq 1 ] || per_node=.%n  # one slurmd per node: its own spool, pid and log
    cat > "$dir/slurm.conf" <<EOF
ClusterName=trapo-test
SlurmctldHost=$ctld
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=300
KillWait=30
MessageTimeout=60
MailProg=/bin/true
SchedulerParameters=sched_interval=5,bf_interval=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool${per_node:+/%n}
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd$per_node.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd$per_node.log
EOF
    for node in "$@"; do
        echo "NodeName=${node%%=*} NodeAddr=${node#*=} CPUs=$cpus RealMemory=$mem State=UNKNOWN" >> "$dir/slurm.conf"
        names+=("${node%%=*}")
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP" \
        >> "$dir/slurm.conf"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

# The network namespaces of DIR's cluster: controller first, then the nodes (none for a single node).
namespaces() { [ -f "$1/netns" ] && cat "$1/netns" || true; }
client() {  # client DIR COMMAND...: a Slurm client where the controller is reachable
    local dir=$1 ns; shift
    ns=$(namespaces "$dir" | head -n1)
    if [ -n "$ns" ]; then nsenter --net="/run/netns/$ns" "$@"; else "$@"; fi
}
in_node() {  # in_node DIR NETNS HOSTNAME COMMAND...: a daemon with its own host name and /etc/hosts
    local dir=$1 ns=$2 host=$3; shift 3
    nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
        bash -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' "$dir/hosts" "$host" "$@"
}

nodes_idle() { [ -z "$(client "$1" sinfo -h -o %t | grep -vx idle)" ] && [ -n "$(client "$1" sinfo -h -o %t)" ]; }

make_network() {  # make_network DIR NODES: the namespaces, the bridge, the veth pairs, the hosts file
    local dir=$1 nodes=$2 id prefix ctl i ns
    id=$(printf %s "$dir" | sha1sum | cut -c1-8)
    prefix=10.$((64 + 0x${id:0:2} % 128)).$((0x${id:2:2}))
    ctl=trapo-$id-ctl
    [ ! -e "/run/netns/$ctl" ] || die "namespace $ctl exists already (run: cluster.sh down $dir)"
    echo "$ctl" > "$dir/netns"
    printf '%s\n' "127.0.0.1 localhost" "$prefix.1 $CTLD_HOST" > "$dir/hosts"
    ip netns add "$ctl"
    ip -n "$ctl" link set lo up
    ip -n "$ctl" link add br0 type bridge
    ip -n "$ctl" addr add "$prefix.1/24" dev br0
    ip -n "$ctl" link set br0 up
    for i in $(seq 1 "$nodes"); do
        ns=trapo-$id-n$i
        echo "$ns" >> "$dir/netns"
        echo "$prefix.$((10 + i)) n$i" >> "$dir/hosts"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip -n "$ctl" link add "veth$i" type veth peer name eth0 netns "$ns"
        ip -n "$ctl" link set "veth$i" master br0 up
        ip -n "$ns" addr add "$prefix.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
    printf '#!/bin/sh\n# a Slurm client (sbatch, srun, scontrol, trapo launch) in the cluster'"'"'s network\nexec nsenter --net=/run/netns/%s "$@"\n' \
        "$ctl" > "$dir/client"
    chmod +x "$dir/client"
}

start_munged() {
    local dir=$1
    mungekey --create --keyfile="$dir/munge/munge.key" --force >/dev/null
    chmod 600 "$dir/munge/munge.key"
    chmod 700 "$dir/munge"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    wait_for 10 munged test -S "$dir/munge/munge.socket" || { tail "$dir/log/munged.log" >&2; die "munged did not start"; }
}

up() {
    local dir=${1:?usage: cluster.sh up DIR [NODES]} nodes=${2:-1}
    [[ $nodes =~ ^[1-9][0-9]*$ ]] && [ "$nodes" -le 200 ] || die "NODES must be 1 to 200, got $nodes"
    have_slurm || install
    mkdir -p "$dir"/{munge,state,spool,run,log}
    dir=$(cd "$dir" && pwd)
    [ ! -e "$dir/run/munged.pid" ] || die "$dir already has a running cluster (run: cluster.sh down $dir)"
    local cpus=${SLURM_NODE_CPUS:-$(nproc)} mem=${SLURM_NODE_MEM_MB:-20000} ctld_port slurmd_port i names=()
    export SLURM_CONF=$dir/slurm.conf
    echo "export SLURM_CONF=$dir/slurm.conf" > "$dir/env"
    if [ "$nodes" = 1 ]; then
        ctld_port=${SLURM_PORT:-$(free_port)}
        slurmd_port=$(( ${SLURM_PORT:-0} ? ctld_port + 1 : $(free_port) ))
        write_conf "$dir" "$cpus" "$mem" "$ctld_port" "$slurmd_port" "$(hostname -s)(127.0.0.1)" "$NODE=127.0.0.1"
        start_munged "$dir"
        slurmctld -f "$dir/slurm.conf"
        wait_for 20 slurmctld scontrol ping || { tail "$dir/log/slurmctld.log" >&2; die "slurmctld does not answer"; }
        slurmd -f "$dir/slurm.conf" -N "$NODE"
        names=("$NODE")
    else
        make_network "$dir" "$nodes"
        ctld_port=${SLURM_PORT:-6817}  # every namespace has ports of its own
        local addrs=()
        for i in $(seq 1 "$nodes"); do
            mkdir -p "$dir/spool/n$i"
            names+=("n$i")
            addrs+=("n$i=$(awk -v n="n$i" '$2 == n {print $1}' "$dir/hosts")")
        done
        write_conf "$dir" "$cpus" "$mem" "$ctld_port" "$((ctld_port + 1))" \
            "$CTLD_HOST($(awk -v n=$CTLD_HOST '$2 == n {print $1}' "$dir/hosts"))" "${addrs[@]}"
        start_munged "$dir"
        in_node "$dir" "$(namespaces "$dir" | head -n1)" "$CTLD_HOST" slurmctld -f "$dir/slurm.conf"
        wait_for 20 slurmctld client "$dir" scontrol ping \
            || { tail "$dir/log/slurmctld.log" >&2; die "slurmctld does not answer"; }
        for i in $(seq 1 "$nodes"); do
            in_node "$dir" "$(namespaces "$dir" | sed -n "$((i + 1))p")" "n$i" slurmd -f "$dir/slurm.conf" -N "n$i"
        done
    fi
    if ! wait_for 60 "idle nodes" nodes_idle "$dir"; then  # 0.3-1.6 s when idle; far more on a loaded machine
        tail "$dir"/log/slurmd*.log "$dir/log/slurmctld.log" >&2
        die "the nodes did not become idle (states: $(client "$dir" sinfo -h -o '%n %t' | tr '\n' ' '))"
    fi
    echo "cluster.sh: $nodes node(s) idle (${names[*]}, $cpus CPUs each); export SLURM_CONF=$dir/slurm.conf" \
        "$([ "$nodes" = 1 ] || echo "; clients through $dir/client")"
}

stop_pid() {  # stop_pid PIDFILE: SIGTERM the daemon it names, wait, then SIGKILL
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        wait_for 15 "exit of $pid" bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

empty_ns() { [ -z "$(ip netns pids "$1")" ]; }
no_jobs() { [ -z "$(client "$1" squeue -h -o %i)" ]; }
no_steps() { [ -z "$(find "$1/spool" -type s -name '*_*.*' 2>/dev/null)" ]; }  # no slurmstepd of this cluster

down() {
    local dir=${1:?usage: cluster.sh down DIR} file ns pid
    dir=$(cd "$dir" && pwd)
    export SLURM_CONF=$dir/slurm.conf
    if [ -f "$dir/run/slurmctld.pid" ] && client "$dir" scontrol ping >/dev/null 2>&1; then
        # jobs first: without it slurmstepd and the job's processes outlive slurmd
        client "$dir" scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        wait_for 60 "no jobs" no_jobs "$dir" || echo "cluster.sh: jobs still listed" >&2
        # the steps' slurmstepd daemons end after their jobs: wait for this cluster's (their spool sockets)
        wait_for 30 "no slurmstepd" no_steps "$dir" || echo "cluster.sh: a slurmstepd is still running" >&2
    fi
    for file in "$dir"/run/slurmd*.pid; do stop_pid "$file"; done
    stop_pid "$dir/run/slurmctld.pid"
    stop_pid "$dir/run/munged.pid"
    # whatever is left in the cluster's own namespaces (a job process that outlived its step) is the
    # cluster's: end it, then delete the namespaces
    for ns in $(namespaces "$dir"); do
        [ -e "/run/netns/$ns" ] || continue
        for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
        wait_for 10 "an empty $ns" empty_ns "$ns" || echo "cluster.sh: $ns is not empty" >&2
        ip netns del "$ns"
    done
    rm -f "$dir/netns"
}
# The login node of `trapo launch --ssh root@127.0.0.1:PORT --ssh-identity DIR/login/id_ed25519`: an sshd of
# its own (key login only, as root) whose sessions get SLURM_CONF and the NAME=VALUE pairs given (sshd_config
# SetEnv), as a login node's shell profile would give them. NeMo-Run copies the experiment over with rsync,
# whose ssh checks host keys strictly (nemo_run/core/tunnel/rsync.py): the host key goes into the system's
# known hosts, marked with DIR, and login-down takes exactly that line out again.
login_up() {
    local dir=${1:?usage: cluster.sh login-up DIR [NAME=VALUE ...]}; shift
    dir=$(cd "$dir" && pwd)
    local login=$dir/login port
    [ ! -e "$login/sshd.pid" ] || die "$login already has a running sshd (run: cluster.sh login-down $dir)"
    mkdir -p "$login" /run/sshd
    chmod 700 "$login"
    port=$(free_port)
    ssh-keygen -q -t ed25519 -N "" -f "$login/host_key" <<<y >/dev/null
    ssh-keygen -q -t ed25519 -N "" -f "$login/id_ed25519" <<<y >/dev/null
    cp "$login/id_ed25519.pub" "$login/authorized_keys"
    printf '%s\n' "Port $port" "ListenAddress 127.0.0.1" "HostKey $login/host_key" "PidFile $login/sshd.pid" \
        "AuthorizedKeysFile $login/authorized_keys" "StrictModes no" "PermitRootLogin prohibit-password" \
        "PasswordAuthentication no" "KbdInteractiveAuthentication no" "UsePAM no" \
        "SetEnv SLURM_CONF=$dir/slurm.conf $*" > "$login/sshd_config"
    /usr/sbin/sshd -f "$login/sshd_config" -E "$login/sshd.log"
    wait_for 10 sshd test -s "$login/sshd.pid" || { tail "$login/sshd.log" >&2; die "sshd did not start"; }
    echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$login/host_key.pub") trapo-login:$dir" >> /etc/ssh/ssh_known_hosts
    echo "$port" > "$login/port"
    echo "cluster.sh: login node root@127.0.0.1:$port (key $login/id_ed25519)"
}

login_down() {
    local dir=${1:?usage: cluster.sh login-down DIR}
    dir=$(cd "$dir" && pwd)
    stop_pid "$dir/login/sshd.pid"
    if [ -f /etc/ssh/ssh_known_hosts ]; then
        grep -vF " trapo-login:$dir" /etc/ssh/ssh_known_hosts > "$dir/login/known_hosts.rest" || true
        cat "$dir/login/known_hosts.rest" > /etc/ssh/ssh_known_hosts
    fi
}

case "${1:-}" in
    install) install ;;
    up) up "${2:-}" "${3:-}" ;;
    down) down "${2:-}" ;;
    login-up) shift; login_up "$@" ;;
    login-down) login_down "${2:-}" ;;
    *) die "usage: cluster.sh install | up DIR [NODES] | down DIR | login-up DIR [NAME=VALUE ...] | login-down DIR" ;;
esac
