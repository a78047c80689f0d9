#!/usr/bin/env bash
# Prints a SLURM_INCLUDE_DIR for Slurm 24.11: a directory under target/
# whose slurm/ links to the cached trixie root's headers (built on first
# use by rootfs.sh). Only slurm/ is exposed, so the root's libc headers do
# not shadow the host's for bindgen. The second line is the root itself,
# for callers that run a cluster on it.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(bash tests/cluster/rootfs.sh)
inc=$PWD/target/cluster/include-24.11
mkdir -p "$inc"
ln -sfn "$root/usr/include/slurm" "$inc/slurm"
echo "$inc"
echo "$root"
