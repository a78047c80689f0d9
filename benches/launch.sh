#!/usr/bin/env bash
# Launch overhead of the plugin (issue 5), printed side by side in one run,
# on a throwaway 2-node Slurm 24.11 cluster with Apptainer 1.4.5:
#   bare         srun -N2 -n4 /bin/true
#   hand-written srun -N2 -n4 apptainer exec <same binds> demo.sif /bin/true
#   plugin       srun -N2 -n4 --ml-container=demo /bin/true
# Medians of RUNS (default 10) runs each. Needs root (namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."

{ read -r inc; read -r root; } < <(bash tests/cluster/include-24.11.sh)
SLURM_INCLUDE_DIR=$inc cargo build --quiet --release --lib --target-dir target/cluster/24.11-release

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
mkdir -p "$stage/etc/slurm/plugstack.conf.d" "$stage/usr/local/bin"
cp plugstack/ml-container.conf "$stage/etc/slurm/plugstack.conf.d/"
cp tests/cluster/demo-inside.sh "$stage/usr/local/bin/mlc-demo"
cat >"$stage/usr/local/bin/mlc-bench" <<INNER
#!/bin/bash
set -euo pipefail
RUNS=${RUNS:-10}
/usr/local/bin/mlc-demo >/dev/null
mkdir -p /shared/data
as_user() { runuser -u mluser -- env -C /home/mluser "\$@"; }
median_ms() {
    local i t0 t1 times=()
    for ((i = 0; i < RUNS; i++)); do
        t0=\$(date +%s%N); as_user "\$@" >/dev/null 2>&1; t1=\$(date +%s%N)
        times+=(\$(((t1 - t0) / 1000000)))
    done
    printf '%s\n' "\${times[@]}" | sort -n | sed -n "\$((RUNS / 2 + 1))p"
}
img=/opt/containers/ml-frameworks/demo.sif
bare=\$(median_ms srun -N2 -n4 /bin/true)
hand=\$(median_ms srun -N2 -n4 apptainer exec --bind /shared/data:/data \$img /bin/true)
plug=\$(median_ms srun -N2 -n4 --ml-container=demo /bin/true)
printf '%-14s %8s\n' variant "median"
printf '%-14s %6s ms\n' bare "\$bare" hand-written "\$hand" plugin "\$plug"
awk -v h="\$hand" -v p="\$plug" 'BEGIN { printf "plugin / hand-written = %.3f (added %+.1f %%)\n", p / h, (p - h) * 100 / h }'
INNER
chmod 0755 "$stage/usr/local/bin/mlc-demo" "$stage/usr/local/bin/mlc-bench"
echo '[runtime]
binds = ["/shared/data:/data"]' >"$stage/etc/slurm/ml-container.toml"

unshare --mount --pid --fork --kill-child -- bash tests/cluster/cluster.sh \
    "$root" 2 target/cluster/24.11-release/release/libslurm_ml_container.so "$stage" \
    /usr/bin/env RUNS="${RUNS:-10}" /usr/local/bin/mlc-bench 2>&1 | grep -v '^munged\|^READY'
