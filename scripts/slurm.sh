#!/usr/bin/env bash
# Start a one-node SLURM on this machine, for the tests of `daskdp run --cluster slurm`.
#
# Idempotent: when `sinfo` already shows a usable node, it does nothing. Otherwise, as root, it
# installs Debian's packages if missing (slurmctld slurmd munge slurm-client), writes
# /etc/slurm/slurm.conf for this host (unless one exists), starts munged, slurmctld and slurmd,
# and waits for the node to be idle. It exits non-zero with the reason on its last line of
# stderr when it cannot; scripts/test.sh passes that reason to the tests, which then skip.
set -euo pipefail

NODE_TIMEOUT=${SLURM_NODE_TIMEOUT:-60}
LOG=/var/log/slurm

fail() {
    echo "scripts/slurm.sh: $*" >&2
    exit 1
}

node_state() {
    sinfo -h -N -o %T 2>/dev/null | head -n1
}

usable() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

ours() {
    grep -qs "written by scripts/slurm.sh" /etc/slurm/slurm.conf
}

# sinfo takes 10 s to give up on a controller that is not running: ask it only when the
# controller may be elsewhere, or runs here.
if command -v sinfo >/dev/null 2>&1 && { ! ours || pgrep -x slurmctld >/dev/null; } && usable; then
    exit 0
fi
[ "$(id -u)" = 0 ] || fail "SLURM is not running and starting it needs root (run: sudo bash scripts/slurm.sh)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || fail "no apt-get on this host to install slurmctld, slurmd, munge, slurm-client"
    packages=(slurmctld slurmd munge slurm-client)
    export DEBIAN_FRONTEND=noninteractive
    apt=(apt-get -q -o Acquire::Retries=1 -o Acquire::http::Timeout=20)
    log=/tmp/daskdp-slurm-apt.log
    # The package lists may be missing or stale: update once if the first attempt fails.
    if ! "${apt[@]}" install -y --no-install-recommends "${packages[@]}" >"$log" 2>&1; then
        "${apt[@]}" update >>"$log" 2>&1 || true
        "${apt[@]}" install -y --no-install-recommends "${packages[@]}" >>"$log" 2>&1 \
            || fail "apt-get install ${packages[*]} failed: $(grep -E '^(E|Err):' "$log" | tail -n1)"
    fi
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG" /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chmod 0400 /etc/munge/munge.key

if [ ! -s /etc/slurm/slurm.conf ]; then
    host=$(hostname -s)
    # This host's real CPUs and memory, as slurmd sees them. No Gres: a node configured with GPUs
    # it does not have is drained ("gres/gpu count reported lower than configured").
    node=$(slurmd -C | head -n1) || fail "slurmd -C could not read this host's configuration"
    case "$node" in NodeName=*) ;; *) fail "unexpected output of slurmd -C: $node" ;; esac
    cat >/etc/slurm/slurm.conf <<EOF
# A one-node SLURM for daskdp's tests, written by scripts/slurm.sh.
ClusterName=daskdp
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Cancelled jobs get SIGKILL 5 s after SIGTERM and leave squeue soon after.
KillWait=5
MinJobAge=10
$node
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
fi

# pgrep only checks whether a daemon runs; nothing is stopped here.
if ! pgrep -x munged >/dev/null; then
    # As root, munged needs --force; it then warns about its directories' owner (munge).
    out=$(munged --force 2>&1) || fail "munged did not start: $out"
fi
if ! pgrep -x slurmctld >/dev/null; then
    slurmctld || fail "slurmctld did not start; see $LOG/slurmctld.log"
fi
if ! pgrep -x slurmd >/dev/null; then
    slurmd || fail "slurmd did not start; see $LOG/slurmd.log"
fi

for _ in $(seq "$NODE_TIMEOUT"); do
    if usable; then
        exit 0
    fi
    state=$(node_state)
    case "$state" in
        down* | drain* | drained*)
            scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
            ;;
    esac
    sleep 1
done
reason=$(sinfo -h -N -o '%T %E' 2>&1 | head -n1)
fail "the SLURM node is not idle after ${NODE_TIMEOUT} s (sinfo: ${reason:-no answer}); see $LOG/"
