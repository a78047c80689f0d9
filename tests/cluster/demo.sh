#!/usr/bin/env bash
# The newcomer's demo: a throwaway 2-node Slurm 24.11 cluster with Apptainer
# 1.4.5 on this machine, the freshly built plugin installed through
# plugstack.conf.d, a demo image in the registry, and
#   srun -N2 -n4 --ml-container=demo ...
# run as an unprivileged user. Everything lives in namespaces and a tmpfs
# overlay; nothing is left running or written outside target/ and the root
# cache when it returns. Needs root (namespaces and mounts).
set -euo pipefail
cd "$(dirname "$0")/../.."

{ read -r inc; read -r root; } < <(bash tests/cluster/include-24.11.sh)
echo "demo: building the plugin against Slurm 24.11's headers" >&2
SLURM_INCLUDE_DIR=$inc cargo build --quiet --lib --target-dir target/cluster/24.11

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/etc/slurm/plugstack.conf.d" "$stage/usr/local/bin"
cp plugstack/ml-container.conf "$stage/etc/slurm/plugstack.conf.d/"
cp tests/cluster/demo-inside.sh "$stage/usr/local/bin/mlc-demo"
chmod 0755 "$stage/usr/local/bin/mlc-demo"

unshare --mount --pid --fork --kill-child -- bash tests/cluster/cluster.sh \
    "$root" 2 target/cluster/24.11/debug/libslurm_ml_container.so "$stage" /usr/local/bin/mlc-demo
