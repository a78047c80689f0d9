#!/usr/bin/env bash
# Build (once) the directory tree of the MPI test image: Debian trixie with
# Debian's Open MPI and mpi4py, made world-readable so that an unprivileged
# `apptainer build` can pack it. Cached like the trixie root; prints its path.
set -euo pipefail
STAMP=mpi-sandbox-v1
CACHE=${MLC_CACHE:-/var/cache/slurm-ml-container}
DIR=$CACHE/$STAMP
if [[ -f $DIR/.complete ]]; then echo "$DIR"; exit 0; fi
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[[ -n $mirror ]] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock-mpi"
flock 9
[[ -f $DIR/.complete ]] && { echo "$DIR"; exit 0; }
rm -rf "$DIR.build"
echo "mpi-sandbox: debootstrap trixie with openmpi-bin and python3-mpi4py (a few minutes)" >&2
debootstrap --variant=minbase --include=openmpi-bin,python3-mpi4py trixie "$DIR.build" "$mirror" >&2
rm -rf "$DIR.build"/var/cache/apt/archives/*.deb "$DIR.build"/var/lib/apt/lists/*
chmod -R a+rX "$DIR.build"
touch "$DIR.build/.complete"
mv "$DIR.build" "$DIR"
echo "$DIR"
