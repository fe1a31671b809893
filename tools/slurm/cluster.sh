#!/usr/bin/env bash
# A throw-away single-node Slurm cluster for the tests and CI: munged + slurmctld + slurmd, all as root,
# no systemd, no cgroup plugins, every file (key, sockets, state, spool, logs, pids) under one directory.
#
#   tools/slurm/cluster.sh install            # apt-get the Debian packages when sbatch/slurmctld are missing
#   tools/slurm/cluster.sh up DIR             # start the daemons, wait for the node to be idle
#   tools/slurm/cluster.sh down DIR           # cancel every job, stop exactly the daemons `up` started
#   . DIR/env                                 # SLURM_CONF for sbatch/srun/squeue/scontrol
#   tools/slurm/cluster.sh login-up DIR [NAME=VALUE ...]   # an sshd "login node" on 127.0.0.1 for `--ssh`
#   tools/slurm/cluster.sh login-down DIR     # stop it, drop its host key from /etc/ssh/ssh_known_hosts
#
# Environment: SLURM_NODE_CPUS (default: this machine's cores), SLURM_NODE_MEM_MB (default 20000),
# SLURM_PORT (slurmctld; slurmd uses SLURM_PORT + 1; default: two free ports).
# Facts this relies on (Slurm 22.05, munge 0.5): the daemons daemonise and write their pid files; clients
# find the config through SLURM_CONF and munged through AuthInfo=socket=...; `scontrol requeue` needs
# cred_expire below the default 120 s to restart a job quickly.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge openssh-server openssh-client rsync)
NODE=trapo-node

die() { echo "cluster.sh: $*" >&2; exit 1; }

have_slurm() { command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v munged >/dev/null && command -v mungekey >/dev/null && [ -x /usr/sbin/sshd ] \
    && command -v ssh-keygen >/dev/null && command -v rsync >/dev/null; }

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

write_conf() {
    local dir=$1 cpus=$2 mem=$3 ctld_port=$4 slurmd_port=$5
    cat > "$dir/slurm.conf" <<EOF
ClusterName=trapo-test
SlurmctldHost=$(hostname -s)(127.0.0.1)
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
MailProg=/bin/true
SchedulerParameters=sched_interval=5,bf_interval=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

node_idle() { sinfo -h -n "$NODE" -o %t | grep -qx idle; }

up() {
    local dir=${1:?usage: cluster.sh up DIR}
    have_slurm || install
    mkdir -p "$dir"/{munge,state,spool,run,log}
    dir=$(cd "$dir" && pwd)
    [ ! -e "$dir/run/munged.pid" ] || die "$dir already has a running cluster (run: cluster.sh down $dir)"
    local cpus=${SLURM_NODE_CPUS:-$(nproc)} mem=${SLURM_NODE_MEM_MB:-20000}
    local ctld_port=${SLURM_PORT:-$(free_port)} slurmd_port
    slurmd_port=$(( ${SLURM_PORT:-0} ? ctld_port + 1 : $(free_port) ))
    write_conf "$dir" "$cpus" "$mem" "$ctld_port" "$slurmd_port"
    echo "export SLURM_CONF=$dir/slurm.conf" > "$dir/env"
    export SLURM_CONF=$dir/slurm.conf

    mungekey --create --keyfile="$dir/munge/munge.key" --force >/dev/null
    chmod 600 "$dir/munge/munge.key"
    chmod 700 "$dir/munge"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    wait_for 10 munged test -S "$dir/munge/munge.socket" || { tail "$dir/log/munged.log" >&2; die "munged did not start"; }

    slurmctld -f "$dir/slurm.conf"
    wait_for 20 slurmctld scontrol ping || { tail "$dir/log/slurmctld.log" >&2; die "slurmctld does not answer"; }
    slurmd -f "$dir/slurm.conf" -N "$NODE"
    if ! wait_for 30 "an idle node" node_idle; then
        tail "$dir/log/slurmd.log" "$dir/log/slurmctld.log" >&2
        die "node $NODE did not become idle (state: $(sinfo -h -n "$NODE" -o %t))"
    fi
    echo "cluster.sh: node $NODE idle ($cpus CPUs); export SLURM_CONF=$dir/slurm.conf"
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

down() {
    local dir=${1:?usage: cluster.sh down DIR}
    dir=$(cd "$dir" && pwd)
    export SLURM_CONF=$dir/slurm.conf
    if [ -f "$dir/run/slurmctld.pid" ] && scontrol ping >/dev/null 2>&1; then
        # jobs first: without it slurmstepd and the job's processes outlive slurmd
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        wait_for 60 "no jobs" bash -c '[ -z "$(squeue -h -o %i)" ]' || echo "cluster.sh: jobs still listed" >&2
        # the steps' slurmstepd daemons end after their jobs; wait for them, never kill them by name
        wait_for 30 "no slurmstepd" bash -c '! pgrep -x slurmstepd' || echo "cluster.sh: slurmstepd still running" >&2
    fi
    stop_pid "$dir/run/slurmd.pid"
    stop_pid "$dir/run/slurmctld.pid"
    stop_pid "$dir/run/munged.pid"
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
    up) up "${2:-}" ;;
    down) down "${2:-}" ;;
    login-up) shift; login_up "$@" ;;
    login-down) login_down "${2:-}" ;;
    *) die "usage: cluster.sh install | up DIR | down DIR | login-up DIR [NAME=VALUE ...] | login-down DIR" ;;
esac
