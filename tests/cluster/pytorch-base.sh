#!/usr/bin/env bash
# Build (once) the Debian root tree that the pytorch-debian recipe packs
# (packaging/recipes/pytorch-debian.def, container_image_base): Debian trixie
# with Debian's PyTorch (CPU), NumPy and Open MPI, from the Debian mirror this
# host's apt uses; world-readable, so that an unprivileged `apptainer build`
# can copy it. About 3 minutes on 2 cores, 1.5 GB. Cached under MLC_CACHE,
# flock'd against concurrent builders, moved into place only when complete.
# Prints its path.
set -euo pipefail
PACKAGES=python3-torch,python3-numpy,openmpi-bin,ca-certificates
SUITE=trixie
# The stamp changes with the package list: a new list is a new tree.
STAMP=pytorch-base-v2-$SUITE-$(printf '%s' "$PACKAGES" | sha256sum | cut -c1-12)
CACHE=${MLC_CACHE:-/var/cache/slurm-ml-container}
DIR=$CACHE/$STAMP
if [[ -f $DIR/.complete ]]; then echo "$DIR"; exit 0; fi
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[[ -n $mirror ]] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock-pytorch-base"
flock 9
[[ -f $DIR/.complete ]] && { echo "$DIR"; exit 0; }
rm -rf "$DIR.build"
echo "pytorch-base: debootstrap $SUITE with $PACKAGES (about 3 minutes)" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$DIR.build" "$mirror" >&2
rm -rf "$DIR.build"/var/cache/apt/archives/*.deb "$DIR.build"/var/lib/apt/lists/*
# Device nodes cannot be copied by an unprivileged build (Apptainer makes
# /dev at run time).
find "$DIR.build/dev" -mindepth 1 -not -type d -delete
chmod -R a+rX "$DIR.build"
touch "$DIR.build/.complete"
mv "$DIR.build" "$DIR"
echo "$DIR"
