#!/usr/bin/env bash
# Prints a SLURM_INCLUDE_DIR for a Slurm release that lives in a cached
# Debian root (rootfs.sh, built on first use):
#
#   include.sh 24.11|26.05
#
# 24.11: the trixie root; 26.05: the sid root. The directory lies under
# target/ and its slurm/ links to the root's headers: only slurm/ is
# exposed, so the root's libc headers do not shadow the host's for bindgen.
# The second line is the root itself, for callers that run a cluster on it.
#
# Several callers run at once (the cluster tests and build-deb.sh from the
# package test), and one of them may be compiling against the link while
# another calls this: the link is left alone when it is already right and
# otherwise replaced by rename(2), so it never disappears, not even briefly.
set -euo pipefail
cd "$(dirname "$0")/../.."
release=${1:?usage: tests/cluster/include.sh 24.11|26.05}
case $release in
    24.11) suite=trixie ;;
    26.05) suite=sid ;;
    *) echo "include.sh: no cached root for Slurm '$release' (24.11 or 26.05)" >&2; exit 2 ;;
esac
root=$(bash tests/cluster/rootfs.sh "$suite")
inc=$PWD/target/cluster/include-$release
want=$root/usr/include/slurm
mkdir -p "$inc"
if [[ $(readlink "$inc/slurm" 2>/dev/null || true) != "$want" ]]; then
    tmp=$inc/.slurm.$$
    ln -sfn "$want" "$tmp"
    mv -Tf "$tmp" "$inc/slurm"
fi
echo "$inc"
echo "$root"
