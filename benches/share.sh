#!/usr/bin/env bash
# One container per node per step (runtime.share_namespaces) against one
# per task and a hand-written `apptainer exec`, side by side in one run, on
# a throwaway 2-node Slurm 24.11 cluster with Apptainer 1.4.5 and the test
# suite's PyTorch image (a 345 MB SIF; built first if not cached):
#   hand-written  srun apptainer exec --bind ... pytorch.sif CMD
#   per-task      srun --ml-container=pytorch CMD, share_namespaces = false
#   shared        srun --ml-container=pytorch CMD, share_namespaces = true
# for 1, 2 and 4 tasks per node:
#   launch        wall ms of a step of `true` (median of RUNS, order rotating)
#   procs, RSS    the runtime's processes on node n1 while a step sleeps
#                 (squashfuse, starter, the instance's init) and their RSS
# and, when the test suite's MPI image is there (target/cluster/images-v2/
# mpi-v2.sqfs), Open MPI's intra-node bandwidth between 2 ranks, shared
# (cross-memory attach) vs per-task (copying through shared memory).
# RUNS (default 5). Needs root. Not part of tests/run.
set -euo pipefail
cd "$(dirname "$0")/.."

{ read -r inc; read -r root; } < <(bash tests/cluster/include-24.11.sh)
SLURM_INCLUDE_DIR=$inc cargo build --quiet --release --lib --target-dir target/cluster/24.11-release
cargo build --quiet --release --bin ml-container-launch
sif=$(ls -t /var/cache/slurm-ml-container/pytorch-sif-*/pytorch.sif 2>/dev/null | head -n 1 || true)
if [[ -z $sif ]]; then
    cargo test --quiet --test cluster scenarios::pytorch::command_missing -- --test-threads=1 >&2
    sif=$(ls -t /var/cache/slurm-ml-container/pytorch-sif-*/pytorch.sif | head -n 1)
fi
mpi=target/cluster/images-v2/mpi-v2.sqfs

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
mkdir -p "$stage/etc/slurm/plugstack.conf.d" "$stage/usr/local/bin" \
    "$stage/opt/containers/.registry" "$stage/opt/containers/ml-frameworks" \
    "$stage/usr/libexec/slurm-ml-container"
install -m 0755 target/release/ml-container-launch "$stage/usr/libexec/slurm-ml-container/"
cp plugstack/ml-container.conf "$stage/etc/slurm/plugstack.conf.d/"
cp benches/mpi_bandwidth.py "$stage/usr/local/bin/"
printf '%s\n' "$(dirname "$sif") /opt/containers/ml-frameworks/pt" >"$stage/.binds"
printf 'version = 1\n[[image]]\nname = "pytorch"\ntag = "bench"\npath = "ml-frameworks/pt/pytorch.sif"\n' \
    >"$stage/opt/containers/.registry/catalog.toml"
[[ -f $mpi ]] && cp "$mpi" "$stage/opt/containers/ml-frameworks/mpi.sqfs"
cat >"$stage/usr/local/bin/mlc-bench" <<'INNER'
#!/bin/bash
set -euo pipefail
RUNS=${RUNS:-5}
as_user() { runuser -u mluser -- env -C /home/mluser "$@"; }
img=/opt/containers/ml-frameworks/pt/pytorch.sif
mkdir -p /shared/data
conf() {  # VARIANT: the site config read per step
    case $1 in
        shared) printf '[runtime]\nshare_namespaces = true\n' ;;
        *) printf '[runtime]\nshare_namespaces = false\n' ;;
    esac >/etc/slurm/ml-container.toml
}
step() {  # VARIANT TASKS_PER_NODE CMD...
    local v=$1 n=$2
    shift 2
    conf "$v"
    case $v in
        hand) as_user srun -N2 --ntasks-per-node="$n" apptainer --quiet exec --bind /shared/data:/data "$img" "$@" ;;
        *) as_user srun -N2 --ntasks-per-node="$n" --ml-container=pytorch "$@" ;;
    esac
}
ms() {
    local TIMEFORMAT='%R' t
    t=$({ time step "$@" >/dev/null 2>&1; } 2>&1) || { echo "bench: $1 failed" >&2; step "$@" >&2 || true; return 1; }
    awk '{ printf "%d\n", $1 * 1000 }' <<<"$t"
}
# The runtime's processes on the cluster while a step of `sleep` runs
# (the nodes share one ps; halved for one node): "COUNT RSS_KB", taken
# once every task's payload runs, the most of five looks.
sample() {  # VARIANT TASKS_PER_NODE
    step "$1" "$2" sleep 5 &
    local pid=$! best="0 0" k cur
    for k in $(seq 1 100); do
        [[ $(pgrep -c -u mluser -x sleep || true) -ge $((2 * $2)) ]] && break
        sleep 0.05
    done
    for k in 1 2 3 4 5; do
        cur=$(ps -u mluser -o rss=,comm= | awk '$2 ~ /^(squashfuse|starter|appinit|Apptainer|sinit)/ { n++; r += $1 } END { printf "%d %d\n", n / 2, r / 2 }')
        [[ ${cur%% *} -gt ${best%% *} ]] && best=$cur
        sleep 0.2
    done
    wait $pid
    echo "$best"
}
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
for v in hand per-task shared; do step $v 2 true; done
printf '%-5s %-12s %10s %7s %10s   (2 nodes, %s rounds, medians; procs and RSS per node)\n' \
    tasks variant launch procs RSS "$RUNS"
order=(hand per-task shared)
for n in 1 2 4; do
    declare -A all=()
    for ((i = 0; i < RUNS; i++)); do
        for ((k = 0; k < 3; k++)); do
            v=${order[$(((i + k) % 3))]}
            all[$v]+="$(ms $v $n true) "
        done
    done
    for v in "${order[@]}"; do
        read -r procs rss < <(sample $v $n)
        printf '%-5s %-12s %7s ms %7s %7s MB\n' "$n" "$v" "$(median <<<"${all[$v]}")" "$procs" "$((rss / 1024))"
    done
done
if [[ -f /opt/containers/ml-frameworks/mpi.sqfs ]]; then
    cp /usr/local/bin/mpi_bandwidth.py /home/mluser/
    bw() {  # VARIANT SMSC
        conf "$1"
        as_user env OMPI_MCA_smsc="$2" srun -w n1 -N1 -n2 --mpi=pmix --ml-container=mpi \
            python3 /home/mluser/mpi_bandwidth.py
    }
    # One after the other (the site config differs), then side by side.
    bw shared cma >/tmp/bw.shared
    bw per-task '^cma' >/tmp/bw.per-task
    paste /tmp/bw.shared /tmp/bw.per-task | awk '
        BEGIN { printf "\n%10s %18s %18s   (Open MPI, 2 ranks on one node, MB/s)\n", "bytes", "shared + CMA", "per-task, copying" }
        { printf "%10d %18d %18d\n", $2, $3, $6 }'
fi
INNER
chmod 0755 "$stage/usr/local/bin/mlc-bench"

unshare --mount --pid --fork --kill-child -- bash tests/cluster/cluster.sh \
    "$root" 2 target/cluster/24.11-release/release/libslurm_ml_container.so "$stage" \
    /usr/bin/env RUNS="${RUNS:-5}" bash ${BENCH_TRACE:+-x} /usr/local/bin/mlc-bench 2>&1 | grep -v '^munged\|^READY'
