#!/usr/bin/env bash
# A one-machine SLURM (munged + slurmctld + slurmd, one partition `cpu`) for tests and trials:
# `--cluster slurm --cluster-config deploy/slurm/cluster.yaml:ci` then submits real batch jobs
# here. Installs Debian's packages if missing (root + apt-get only), writes /etc/slurm/slurm.conf
# for this host, starts the daemons and waits until `sinfo` shows the node ready. Idempotent: a
# second call finds it running and exits 0. Exits non-zero with one line on stderr when it cannot.
# Not for production: the daemons run as root and processes are tracked without cgroups.
set -euo pipefail

host=$(hostname -s)
conf=/etc/slurm/slurm.conf
logs=/var/log/slurm
fail() { echo "slurm/local/start.sh: $*" >&2; exit 1; }

ready() {  # the node accepts jobs (idle, or already running some)
  command -v sinfo >/dev/null && timeout 5 sinfo -h -n "$host" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)$'
}

cpus=$(nproc --all)  # the machine's, not the caller's affinity mask (a caller under taskset sees fewer)
if ready; then
  if [ "$(timeout 5 sinfo -h -n "$host" -o %c 2>/dev/null)" = "$cpus" ]; then
    echo "slurm: already running ($(sinfo -h -n "$host" -o '%P %T %c CPUs %m MB'))"; exit 0
  fi
  # running with another CPU count than this machine has (an older slurm.conf): write it anew, restart
  pkill -x slurmctld || true; pkill -x slurmd || true
  for _ in $(seq 50); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.1; done
fi

packages=(slurmctld slurmd slurm-client munge)
if ! dpkg -s "${packages[@]}" >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || fail "slurm is not installed and installing it needs root (apt-get install ${packages[*]})"
  command -v apt-get >/dev/null || fail "slurm is not installed and there is no apt-get to install it"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"; } \
    >/tmp/slurm-local-apt.log 2>&1 || fail "apt-get install ${packages[*]} failed (see /tmp/slurm-local-apt.log)"
fi
[ "$(id -u)" = 0 ] || fail "starting munged, slurmctld and slurmd needs root"

# munge: the key authenticates every message between the SLURM commands and daemons
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged || fail "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null 2>&1 || fail "munged started but munge -n | unmunge fails"
fi

# slurm.conf for this host: all CPUs, 90% of the memory (the node is drained if it claims more
# than it has), cores and memory consumable so that several small jobs share the node
mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /run/slurm "$logs"
cat >"$conf.new" <<CONF
# written by deploy/slurm/local/start.sh for $host
ClusterName=cryodask-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=60
NodeName=$host NodeAddr=$(getent hosts "$host" >/dev/null && echo "$host" || echo 127.0.0.1) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
mv "$conf.new" "$conf"

pgrep -x slurmctld >/dev/null || slurmctld || fail "slurmctld did not start (see $logs/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || fail "slurmd did not start (see $logs/slurmd.log)"
for _ in $(seq 120); do
  ready && break
  # a node that registered DOWN or DRAINED after an earlier stop: bring it back
  timeout 5 sinfo -h -n "$host" -o %T 2>/dev/null | grep -Eq '^(down|drain)' \
    && scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
  sleep 0.5
done
ready || fail "the node $host is not ready after 60 s: $(sinfo -h -n "$host" -o '%T %E' 2>&1 | head -1) (see $logs/)"
echo "slurm: running ($(sinfo -h -n "$host" -o '%P %T %c CPUs %m MB'))"
