#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing the SLURM profile.
#
#   bash scripts/slurm-cluster.sh install   # apt-get install slurm-wlm munge (root), if missing
#   bash scripts/slurm-cluster.sh start     # munge key, slurm.conf, start munged/slurmctld/slurmd
#   bash scripts/slurm-cluster.sh status    # sinfo / squeue
#   bash scripts/slurm-cluster.sh stop      # stop the daemons by the PIDs they recorded
#
# No systemd: the daemons are started directly and write their PID files under
# $STATE (default /tmp/diapipe-slurm); `stop` kills exactly those PIDs.
#
# Facts this script works around (Slurm 22.05, snakemake-executor-plugin-slurm 2.8.0):
#  - no slurmdbd here, so `sacct` fails: the profile uses `slurm-status-command: squeue`
#    and MinJobAge keeps finished jobs visible to squeue for 10 minutes;
#  - the plugin's in-job step drops every SLURM_* variable (SLURM_CONF too), so the
#    config goes to the default path /etc/slurm/slurm.conf (an existing one that this
#    script did not write is left alone: start refuses, unless FORCE=1);
#  - munged needs its socket directory world-executable; MailProg=/bin/true and the
#    hardware line from `slurmd -C` silence errors; DefMemPerCPU stops a job without
#    --mem from taking the whole node.
set -euo pipefail

STATE=${STATE:-/tmp/diapipe-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by diapipe scripts/slurm-cluster.sh"
MUNGE_RUN=/run/munge

die() { echo "slurm-cluster: $*" >&2; exit 1; }
say() { echo "slurm-cluster: $*" >&2; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (it writes $CONF and starts daemons)"; }

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; }

do_install() {
    if installed; then
        say "slurm-wlm and munge already installed ($(slurmd -V))"
        return
    fi
    need_root
    command -v apt-get >/dev/null || die "no apt-get: install slurm-wlm and munge with your package manager"
    say "installing slurm-wlm and munge with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if pid_alive "$STATE/munged.pid"; then return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating a munge key"
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chmod 755 "$MUNGE_RUN"   # clients (sbatch, slurmd) must reach the socket
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_RUN/munged.pid"
    for _ in $(seq 50); do [ -s "$MUNGE_RUN/munged.pid" ] && break; sleep 0.1; done
    cp "$MUNGE_RUN/munged.pid" "$STATE/munged.pid"
    munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "${FORCE:-0}" != 1 ]; then
        die "$CONF exists and was not written by this script; set FORCE=1 to replace it (a backup is kept)"
    fi
    [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && cp "$CONF" "$CONF.bak.$(date +%s)"
    local hw host
    # The hardware line as slurmd sees it (CPUs, sockets, cores, RealMemory); no UpTime.
    hw=$(slurmd -C | head -n 1)
    host=$(hostname -s)
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
    cat >"$CONF" <<EOF
$MARK: a one-node test cluster
ClusterName=diapipe
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
MinJobAge=600
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
$hw NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # cgroup.conf is read even with the linuxproc plugins on some builds; keep it harmless.
    [ -f /etc/slurm/cgroup.conf ] || echo "CgroupPlugin=autodetect" >/etc/slurm/cgroup.conf
}

do_start() {
    need_root
    installed || die "slurm-wlm/munge not installed: run '$0 install' first"
    mkdir -p "$STATE"
    start_munge
    write_conf
    if ! pid_alive "$STATE/slurmctld.pid"; then
        slurmctld -c   # daemonizes; -c: start from a clean state
    fi
    if ! pid_alive "$STATE/slurmd.pid"; then
        slurmd
    fi
    # Wait for the node to come up idle (slurmd registers within a few seconds).
    local state=""
    for _ in $(seq 60); do
        state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)
        case "$state" in
            idle|mixed|allocated) break ;;
            down*|drain*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    case "$state" in
        idle|mixed|allocated) ;;
        *) tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
           die "node did not come up (state: '${state:-none}'); logs in $STATE" ;;
    esac
    say "cluster up: $(sinfo -h -o '%P %D %T %c CPUs %m MB')"
    say "PIDs: munged $(cat "$STATE/munged.pid"), slurmctld $(cat "$STATE/slurmctld.pid"), slurmd $(cat "$STATE/slurmd.pid")"
}

stop_pid() {
    local name=$1 file=$2 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name ($pid) did not stop; SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
    say "stopped $name ($pid)"
}

do_stop() {
    # Jobs still queued or running are cancelled first, so slurmd leaves no strays.
    if pid_alive "$STATE/slurmctld.pid"; then scancel --full --user="$(id -un)" 2>/dev/null || true; fi
    stop_pid slurmd "$STATE/slurmd.pid"
    stop_pid slurmctld "$STATE/slurmctld.pid"
    stop_pid munged "$STATE/munged.pid"
}

do_status() {
    for d in munged slurmctld slurmd; do
        if pid_alive "$STATE/$d.pid"; then echo "$d running ($(cat "$STATE/$d.pid"))"; else echo "$d not running"; fi
    done
    sinfo 2>/dev/null || true
    squeue 2>/dev/null || true
}

case "${1:-}" in
    install) do_install ;;
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
