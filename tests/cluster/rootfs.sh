#!/usr/bin/env bash
# Build (once) a Debian root that carries a Slurm release and Apptainer 1.4.5:
#
#   rootfs.sh [trixie|sid]
#
# trixie (the default): Slurm 24.11; sid: Slurm 26.05.
# Why a root and not the host: Apptainer 1.4.5 exists only in Debian sid and
# needs glibc >= 2.38, the host (bookworm) has 2.36 (docs/DESIGN.md,
# Apptainer facts).
#
# The result is cached under $MLC_CACHE (default /var/cache/slurm-ml-container)
# in a directory named after the suite's stamp; bump a stamp when its package
# list changes and every machine rebuilds that root. Prints the root's path
# on stdout.
set -euo pipefail

SUITE=${1:-trixie}
CACHE=${MLC_CACHE:-/var/cache/slurm-ml-container}
case $SUITE in
    # The trixie stamp and lock are those of the time before sid joined, so
    # existing caches stay valid.
    trixie) ROOTFS_STAMP=trixie-v1 LOCK=$CACHE/.lock ;;
    sid) ROOTFS_STAMP=sid-v1 LOCK=$CACHE/.lock-sid ;;
    *) echo "rootfs: unknown suite '$SUITE' (trixie or sid)" >&2; exit 2 ;;
esac
ROOT=$CACHE/$ROOTFS_STAMP
PACKAGES=(slurmctld slurmd slurm-client libslurm-dev munge squashfuse fuse2fs
          iproute2 procps busybox-static valgrind passwd python3)

if [[ -f $ROOT/.complete ]]; then
    echo "$ROOT"
    exit 0
fi

log() { echo "rootfs: $*" >&2; }

# The mirror is whatever the host's apt uses; no host name is written down here.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [[ -z $mirror ]]; then
    mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
[[ -n $mirror ]] || { log "cannot find the Debian mirror in the host's apt configuration"; exit 1; }

command -v debootstrap >/dev/null || { log "debootstrap missing: apt-get install debootstrap"; exit 1; }

mkdir -p "$CACHE"
exec 9>"$LOCK"
flock 9
[[ -f $ROOT/.complete ]] && { echo "$ROOT"; exit 0; }

build=$ROOT.build
rm -rf "$build"
log "debootstrap $SUITE into $build (about a minute)"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$build" "$mirror" >&2

if [[ $SUITE == sid ]]; then
    # The mirror serves a snapshot whose sid Release file has passed its
    # validity date: apt inside the root must not refuse it.
    echo 'Acquire::Check-Valid-Until "false";' >"$build/etc/apt/apt.conf.d/99mlc-snapshot"
    PACKAGES+=(apptainer)
else
    # Apptainer is only in sid: fetch its .deb with a private apt state so
    # that the host's apt is left untouched.
    apt_state=$(mktemp -d)
    trap 'rm -rf "$apt_state"' EXIT
    mkdir -p "$apt_state/lists/partial" "$apt_state/cache/archives/partial"
    echo "deb $mirror sid main" >"$apt_state/sources.list"
    apt_opts=(-o "Dir::State::Lists=$apt_state/lists" -o "Dir::Etc::SourceList=$apt_state/sources.list"
              -o "Dir::Etc::SourceParts=/nonexistent" -o "Dir::Cache=$apt_state/cache"
              -o "Acquire::Check-Valid-Until=false")
    log "fetching apptainer from sid"
    apt-get "${apt_opts[@]}" update >&2
    (cd "$build/tmp" && apt-get "${apt_opts[@]}" download apptainer >&2)
fi

# Keep package scripts from starting services inside the root.
printf '#!/bin/sh\nexit 101\n' >"$build/usr/sbin/policy-rc.d"
chmod 0755 "$build/usr/sbin/policy-rc.d"

log "installing ${PACKAGES[*]}"
unshare --mount --fork -- sh -ec '
    mount --make-rprivate /
    mount -t proc proc "$1/proc"
    mount --rbind /dev "$1/dev"
    shift
    root=$1; shift
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
    if ls "$root"/tmp/apptainer_*.deb >/dev/null 2>&1; then
        chroot "$root" sh -c "env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq /tmp/apptainer_*.deb"
    fi
    chroot "$root" apt-get clean
' sh "$build" "$build" "${PACKAGES[@]}" >&2
rm -f "$build"/tmp/apptainer_*.deb

# The unprivileged test user, the same uid in every cluster.
chroot "$build" useradd --create-home --uid 1500 --user-group --shell /bin/sh mluser

chroot "$build" apptainer --version >&2
chroot "$build" dpkg-query -W slurmd slurm-client >&2
touch "$build/.complete"
mv "$build" "$ROOT"
echo "$ROOT"
