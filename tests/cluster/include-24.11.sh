#!/usr/bin/env bash
# Prints a SLURM_INCLUDE_DIR for Slurm 24.11: a directory under target/
# whose slurm/ links to the cached trixie root's headers (built on first
# use by rootfs.sh). Only slurm/ is exposed, so the root's libc headers do
# not shadow the host's for bindgen. The second line is the root itself,
# for callers that run a cluster on it.
#
# Several callers run at once (the cluster tests and build-deb.sh from the
# package test), and one of them may be compiling against the link while
# another calls this: the link is left alone when it is already right and
# otherwise replaced by rename(2), so it never disappears, not even briefly.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(bash tests/cluster/rootfs.sh)
inc=$PWD/target/cluster/include-24.11
want=$root/usr/include/slurm
mkdir -p "$inc"
if [[ $(readlink "$inc/slurm" 2>/dev/null || true) != "$want" ]]; then
    tmp=$inc/.slurm.$$
    ln -sfn "$want" "$tmp"
    mv -Tf "$tmp" "$inc/slurm"
fi
echo "$inc"
echo "$root"
