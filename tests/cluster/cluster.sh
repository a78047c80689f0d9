#!/usr/bin/env bash
# A throwaway multi-node Slurm cluster on one machine (docs/DESIGN.md,
# Slurm facts per release: several slurmd on one machine).
#
#   unshare --mount --pid --fork --kill-child -- cluster.sh LOWER NODES PLUGIN_SO STAGE [CMD...]
#
# Runs as pid 1 of a fresh pid namespace, in a private mount namespace:
# LOWER (the cached trixie root, or / for the host's Slurm) is overlaid with
# a tmpfs so nothing a test does reaches the cache or the host; each node gets
# its own network and UTS namespace (hostname nX, address 10.77.0.X) behind a
# bridge in a namespace of its own. STAGE is a directory whose files are
# copied over the root before the daemons start (test configs, images).
#
# Prints READY when every node is idle, then runs CMD as root inside node n1
# and exits with its status, or, without CMD, waits for EOF on stdin. When
# this script exits, the kernel kills every process of the pid namespace:
# no daemon outlives its test. The harness finds node anchors by their
# argv[0], mlc-anchor-nX, and enters them with nsenter.
#
# Node names are n1..nN unless STAGE/etc/slurm/node-names holds a pattern
# with one %d, such as gpu%d-ib: node X is then gpu X-ib to Slurm (NodeName,
# hostname, /etc/hosts; slurm.conf says NodeName=gpu[1-N]-ib), while its
# anchor and network namespace keep the index (mlc-anchor-nX, netns nX).
set -euo pipefail

LOWER=$1
NODES=$2
PLUGIN=$3
STAGE=$4
shift 4
CMD=("$@")
# The mount point of the cluster's tmpfs. It stays behind on the host as an
# empty directory (the tmpfs lives only in this mount namespace), so the
# test harness puts it in its own temporary directory (MLC_SCRATCH_PARENT),
# which it removes; the demo leaves it in /tmp.
SCRATCH=$(mktemp -d "${MLC_SCRATCH_PARENT:-/tmp}/mlc-cluster.XXXXXX")

log() { echo "cluster: $*" >&2; }
die() { log "$*"; exit 1; }

NAME_PATTERN=n%d
if [[ -f $STAGE/etc/slurm/node-names ]]; then
    NAME_PATTERN=$(head -n 1 "$STAGE/etc/slurm/node-names")
fi
[[ $NAME_PATTERN =~ ^[A-Za-z0-9._-]*%d[A-Za-z0-9._-]*$ ]] ||
    die "node name pattern '$NAME_PATTERN': letters, digits, '.', '_', '-' and one %d"
name() { echo "${NAME_PATTERN/\%d/$1}"; }

[[ $$ == 1 ]] || die "must run as pid 1 of a new pid namespace (unshare --pid --fork)"
# PLUGIN "-": install no plugin (a test installs the package instead).
[[ $PLUGIN == - || -f $PLUGIN ]] || die "plugin $PLUGIN not found"

mount --make-rprivate /
mount -t tmpfs -o mode=0755 mlc-scratch "$SCRATCH"
mkdir -p "$SCRATCH"/{upper,work,root}
mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$SCRATCH/upper,workdir=$SCRATCH/work" "$SCRATCH/root"
R=$SCRATCH/root

mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
# A /dev of the cluster's own: the host's entries bound one by one onto a
# tmpfs, so a test can put a syslog socket at /dev/log without creating it
# on the host (and without seeing another cluster's).
mount -t tmpfs -o mode=0755 mlc-dev "$R/dev"
for e in /dev/* /dev/.[!.]*; do
    [[ -e $e || -L $e ]] || continue
    d=$R$e
    if [[ -L $e ]]; then
        cp -P "$e" "$d"
    elif [[ -d $e ]]; then
        mkdir -p "$d" && mount --rbind "$e" "$d"
    else
        touch "$d" && mount --bind "$e" "$d"
    fi
done
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
mount -t tmpfs -o mode=0755 tmpfs "$R/run"
# Unprivileged Apptainer mounts SIF images with squashfuse, and /dev/fuse
# is 0600 on these machines (docs/DESIGN.md, Apptainer facts).
[[ -e /dev/fuse ]] && chmod 0666 /dev/fuse

plugin_dir=/usr/lib/x86_64-linux-gnu/slurm-wlm
[[ $PLUGIN == - ]] || install -m 0755 "$PLUGIN" "$R$plugin_dir/spank_ml_container.so"
mkdir -p "$R/etc/slurm/plugstack.conf.d" "$R/var/log/slurm" "$R/var/spool/slurmctld"
for i in $(seq 1 "$NODES"); do mkdir -p "$R/var/spool/slurmd/$(name "$i")"; done
echo 'include /etc/slurm/plugstack.conf.d/*.conf' >"$R/etc/slurm/plugstack.conf"

{
    echo "127.0.0.1 localhost"
    echo "127.0.1.1 $(hostname)" # munged looks up its own name
    for i in $(seq 1 "$NODES"); do echo "10.77.0.$i $(name "$i")"; done
} >"$R/etc/hosts"

# slurm.conf: the settings verified for several slurmd on one machine
# (docs/DESIGN.md, Slurm facts per release). config_overrides lets nodes claim 4 CPUs on a 2-core machine.
cat >"$R/etc/slurm/slurm.conf" <<CONF
ClusterName=mlc
SlurmctldHost=$(name 1)(10.77.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PlugStackConfig=/etc/slurm/plugstack.conf
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$(name "[1-$NODES]") CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
if [[ -f $R/usr/include/slurm/slurm_version.h ]] &&
    ! grep -q 'SLURM_VERSION_NUMBER 0x16' "$R/usr/include/slurm/slurm_version.h"; then
    echo "CgroupPlugin=disabled" >"$R/etc/slurm/cgroup.conf"
fi

# Test files last, so a test can replace any of the above;
# etc/slurm/slurm.conf.extra is appended to slurm.conf (TaskProlog, GRES...).
if [[ -d $STAGE ]]; then
    cp -a "$STAGE/." "$R/"
    chmod 0755 "$R" # cp -a gave the root the stage directory's mode
    # etc/slurm/node-gres (e.g. "gpu:2") gives every node that GRES.
    if [[ -f $R/etc/slurm/node-gres ]]; then
        sed -i "s|^NodeName=.*|& Gres=$(cat "$R/etc/slurm/node-gres")|" "$R/etc/slurm/slurm.conf"
        echo "GresTypes=gpu" >>"$R/etc/slurm/slurm.conf"
    fi
    # etc/slurm/node-extra (e.g. "RealMemory=2000") is added to every node's line.
    if [[ -f $R/etc/slurm/node-extra ]]; then
        sed -i "s|^NodeName=.*|& $(cat "$R/etc/slurm/node-extra")|" "$R/etc/slurm/slurm.conf"
    fi
    if [[ -f $R/etc/slurm/slurm.conf.extra ]]; then
        cat "$R/etc/slurm/slurm.conf.extra" >>"$R/etc/slurm/slurm.conf"
    fi
fi

# STAGE/.binds: "HOST_DIR INSIDE" lines, bound read-only (big trees such as
# an image sandbox, without copying them).
if [[ -f $STAGE/.binds ]]; then
    while read -r host inside; do
        [[ -n $host ]] || continue
        mkdir -p "$R$inside"
        mount --bind "$host" "$R$inside"
        mount -o remount,bind,ro "$R$inside"
    done <"$STAGE/.binds"
    rm -f "$R/.binds"
fi

cd "$R"
mkdir -p .oldroot
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot 2>/dev/null || true

id mluser >/dev/null 2>&1 || useradd --create-home --uid 1500 --user-group --shell /bin/sh mluser
# A second user in mluser's primary group: what a group-mate (not the job's
# user) can see of a job's files.
id mluser2 >/dev/null 2>&1 || useradd --create-home --uid 1501 --gid 1500 --shell /bin/sh mluser2

# munge: one daemon serves every node through the shared /run.
mkdir -p /run/munge /etc/munge /var/lib/munge /var/log/munge
[[ -f /etc/munge/munge.key ]] || mungekey -c -k /etc/munge/munge.key
chown -R munge:munge /run/munge /etc/munge /var/lib/munge /var/log/munge
chmod 0600 /etc/munge/munge.key
chmod 0755 /run/munge
runuser -u munge -- /usr/sbin/munged

# The network: a bridge in its own namespace, one veth into each node.
ip netns add br
ip -n br link add br0 type bridge
ip -n br link set br0 up
for i in $(seq 1 "$NODES"); do
    ip netns add "n$i"
    ip link add "v$i" netns br type veth peer name eth0 netns "n$i"
    ip -n br link set "v$i" master br0
    ip -n br link set "v$i" up
    ip -n "n$i" addr add "10.77.0.$i/24" dev eth0
    ip -n "n$i" link set eth0 up
    ip -n "n$i" link set lo up
done

# One anchor per node holds its namespaces (net from ip netns, a UTS with
# the node's hostname, a mount namespace with its own /tmp); every daemon
# and test command enters the anchor.
declare -A anchor
for i in $(seq 1 "$NODES"); do
    # nsenter --net rather than "ip netns exec": the latter remounts /sys,
    # which hides the cgroup mounts Slurm 22.05's slurmd insists on.
    # Each node also gets its own /tmp, as real nodes have: Slurm's PMIx
    # plugin, for one, creates the same /tmp/spmix_appdir_* on every node.
    nsenter --net="/run/netns/n$i" -- unshare --uts --mount --propagation private -- \
        bash -c "mount -t tmpfs -o mode=1777 tmpfs /tmp; hostname $(name "$i"); exec -a mlc-anchor-n$i sleep infinity" &
    anchor[$i]=$!
done
sleep 0.2
in_node() {
    local i=$1
    shift
    nsenter -t "${anchor[$i]}" -m -u -n -- "$@"
}

in_node 1 slurmctld -D -i >/var/log/slurm/slurmctld.stdout 2>&1 &
for i in $(seq 1 "$NODES"); do
    in_node "$i" slurmd -D -N "$(name "$i")" >"/var/log/slurm/slurmd-n$i.stdout" 2>&1 &
done

deadline=$((SECONDS + 60))
while :; do
    states=$(in_node 1 sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    [[ $states == "idle " ]] && break
    if ((SECONDS > deadline)); then
        log "nodes not idle after 60 s (sinfo: '$states')"
        tail -n 30 /var/log/slurm/*.log >&2 || true
        exit 1
    fi
    sleep 0.2
done

echo READY
if ((${#CMD[@]})); then
    rc=0
    in_node 1 "${CMD[@]}" || rc=$?
    exit "$rc"
fi
# Hold the cluster until the harness closes our stdin (or dies).
read -r _ || true
