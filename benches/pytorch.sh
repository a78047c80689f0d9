#!/usr/bin/env bash
# import torch and a DDP init (gloo, env://, one barrier) across 2 nodes x 2
# tasks, side by side in one run, on a throwaway Slurm 24.11
# cluster with the test suite's pytorch image (built first if not cached):
#   bare         srun python3 from the image's Debian tree, no container
#                (its own dynamic loader and libraries, PYTHONHOME; the
#                BLAS/LAPACK directories that Debian's alternatives point to)
#   hand-written srun apptainer exec pytorch.sif python3 ...
#   plugin       srun --ml-container=pytorch python3 ...
# RUNS (default 3) rounds, order rotating; medians in ms. Needs root.
# Not part of tests/run: each round is ~6 launches of 4 torch imports.
set -euo pipefail
cd "$(dirname "$0")/.."

{ read -r inc; read -r root; } < <(bash tests/cluster/include-24.11.sh)
SLURM_INCLUDE_DIR=$inc cargo build --quiet --release --lib --target-dir target/cluster/24.11-release
cargo build --quiet --release --bin ml-container-launch
base=$(bash tests/cluster/pytorch-base.sh)
# The image the tests build (ml-container build pytorch-debian), cached.
sif=$(ls -t /var/cache/slurm-ml-container/pytorch-sif-*/pytorch.sif 2>/dev/null | head -n 1 || true)
if [[ -z $sif ]]; then
    cargo test --quiet --test cluster scenarios::pytorch::command_missing -- --test-threads=1 >&2
    sif=$(ls -t /var/cache/slurm-ml-container/pytorch-sif-*/pytorch.sif | head -n 1)
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
mkdir -p "$stage/etc/slurm/plugstack.conf.d" "$stage/usr/local/bin" "$stage/opt/containers/.registry" \
    "$stage/usr/libexec/slurm-ml-container"
# Every containerized task runs under the launcher.
install -m 0755 target/release/ml-container-launch "$stage/usr/libexec/slurm-ml-container/"
cp plugstack/ml-container.conf "$stage/etc/slurm/plugstack.conf.d/"
printf '%s\n' "$base /bases/pytorch" "$(dirname "$sif") /opt/containers/ml-frameworks/pt" >"$stage/.binds"
printf 'version = 1\n[[image]]\nname = "pytorch"\ntag = "bench"\npath = "ml-frameworks/pt/pytorch.sif"\n' \
    >"$stage/opt/containers/.registry/catalog.toml"
cp examples/ddp.py "$stage/usr/local/bin/ddp.py"
cat >"$stage/usr/local/bin/mlc-bench" <<'INNER'
#!/bin/bash
set -euo pipefail
RUNS=${RUNS:-3}
cp /usr/local/bin/ddp.py /home/mluser/ddp.py
as_user() { runuser -u mluser -- env -C /home/mluser "$@"; }
img=/opt/containers/ml-frameworks/pt/pytorch.sif
B=/bases/pytorch
IMPORT='import torch'
# DDP init only: the process group, one barrier, teardown.
INIT='import os, torch.distributed as d; d.init_process_group("gloo", init_method="env://"); d.barrier(); d.destroy_process_group(); os._exit(0)'
# What a user writes by hand without the plugin: the distributed variables
# from Slurm's (a port per job: each launch is a job of its own).
DIST='export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID MASTER_ADDR=n1 MASTER_PORT=$((20000 + SLURM_JOB_ID % 1000)); exec "$@"'
py() {  # VARIANT CODE
    local s=(srun -N2 --ntasks-per-node=2)
    case $1 in
        bare) as_user "${s[@]}" sh -c "$DIST" sh env PYTHONHOME=$B/usr USE_LIBUV=0 $B/lib64/ld-linux-x86-64.so.2 \
                  --library-path $B/usr/lib/x86_64-linux-gnu:$B/usr/lib/x86_64-linux-gnu/blas:$B/usr/lib/x86_64-linux-gnu/lapack:$B/usr/lib \
                  $B/usr/bin/python3 -c "$2" ;;
        hand) as_user "${s[@]}" sh -c "$DIST" sh apptainer exec "$img" python3 -c "$2" ;;
        plugin) as_user "${s[@]}" --ml-container=pytorch python3 -c "$2" ;;
    esac
}
ms() {  # VARIANT CODE -> wall ms of one launch
    local TIMEFORMAT='%R' t
    t=$({ time py "$1" "$2" >/dev/null 2>&1; } 2>&1) || { echo "bench: $1 failed" >&2; py "$1" "$2" >&2 || true; return 1; }
    awk '{ printf "%d\n", $1 * 1000 }' <<<"$t"
}
# Warm-up, output shown: every variant must work before it is timed.
for v in bare hand plugin; do echo "== $v"; py $v 'import torch, sys; print(torch.__version__, sys.executable)'; done
declare -A imp init
order=(bare hand plugin)
for ((i = 0; i < RUNS; i++)); do
    for ((k = 0; k < 3; k++)); do
        v=${order[$(((i + k) % 3))]}
        imp[$v]+="$(ms $v "$IMPORT") "
        init[$v]+="$(ms $v "$INIT") "
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
printf '%-14s %16s %22s   (2 nodes x 2 tasks, %s rounds, medians)\n' variant "import torch" "import + DDP init" "$RUNS"
for v in bare hand plugin; do
    printf '%-14s %13s ms %19s ms\n' "${v/hand/hand-written}" "$(median <<<"${imp[$v]}")" "$(median <<<"${init[$v]}")"
done
INNER
chmod 0755 "$stage/usr/local/bin/mlc-bench"
echo '[runtime]
binds = []' >"$stage/etc/slurm/ml-container.toml"

unshare --mount --pid --fork --kill-child -- bash tests/cluster/cluster.sh \
    "$root" 2 target/cluster/24.11-release/release/libslurm_ml_container.so "$stage" \
    /usr/bin/env RUNS="${RUNS:-3}" bash ${BENCH_TRACE:+-x} /usr/local/bin/mlc-bench 2>&1 | grep -v '^munged\|^READY'
