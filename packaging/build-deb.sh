#!/usr/bin/env bash
# Builds slurm-ml-container_<version>+slurm<X.Y>_amd64.deb for one Slurm:
#
#   packaging/build-deb.sh 22.05|24.11|26.05 [OUTDIR] [VERSION]
#
# 22.05: Debian 12's Slurm (the host's headers); 24.11: Debian 13's (the
# headers of the cached trixie root); 26.05: Debian sid's (the cached sid
# root; both roots from tests/cluster/rootfs.sh, through include.sh). The
# build's hostlist rules follow the headers (src/hostlist.rs). The package
# depends on that Slurm release only (Slurm refuses plugins of another
# major.minor). Plain dpkg-deb: no debhelper needed.
set -euo pipefail
cd "$(dirname "$0")/.."

slurm=${1:?usage: packaging/build-deb.sh 22.05|24.11|26.05 [OUTDIR] [VERSION]}
out=${2:-target/deb}
version=${3:-$(awk -F'"' '/^version = /{print $2; exit}' Cargo.toml)}
case $slurm in
    22.05) inc=/usr/include ;;
    24.11 | 26.05)
        # Its first line. Not "| head -n 1": head may exit before the
        # script's second line, which then dies of SIGPIPE, and pipefail
        # fails this build without a word (seen under load in CI).
        inc=$(bash tests/cluster/include.sh "$slurm")
        inc=${inc%%$'\n'*}
        ;;
    *) echo "build-deb: unknown Slurm '$slurm' (22.05, 24.11 or 26.05)" >&2; exit 2 ;;
esac
major=${slurm%%.*}
minor=${slurm#*.}
next="$major.$(printf '%02d' $((10#$minor + 1)))"
# Slurm releases go YY.05, YY.11; the next one after YY.11 is (YY+1).05.
[[ $minor == 11 ]] && next="$((major + 1)).05"

target=target/deb-build/$slurm
SLURM_INCLUDE_DIR=$inc cargo build --quiet --release --target-dir "$target" --bins --lib

pkg=slurm-ml-container
debver="$version+slurm$slurm"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -D -m 0644 "$target/release/libslurm_ml_container.so" \
    "$stage/usr/lib/x86_64-linux-gnu/slurm-wlm/spank_ml_container.so"
install -D -m 0755 "$target/release/ml-container" "$stage/usr/bin/ml-container"
install -D -m 0755 "$target/release/ml-container-launch" \
    "$stage/usr/libexec/slurm-ml-container/ml-container-launch"
strip --strip-unneeded "$stage/usr/lib/x86_64-linux-gnu/slurm-wlm/spank_ml_container.so" \
    "$stage/usr/bin/ml-container" "$stage/usr/libexec/slurm-ml-container/ml-container-launch"
# The plugstack line lives under /usr and is linked into plugstack.conf.d by
# postinst: a dpkg conffile there would survive "apt-get remove" and make
# every srun fail on the missing required plugin.
install -D -m 0644 plugstack/ml-container.conf \
    "$stage/usr/share/slurm-ml-container/plugstack/ml-container.conf"
install -D -m 0644 packaging/debian/ml-container.toml "$stage/etc/slurm/ml-container.toml"
# Bounded logs: metrics log rotation, report expiry.
install -D -m 0644 packaging/debian/logrotate "$stage/etc/logrotate.d/slurm-ml-container"
install -D -m 0644 packaging/debian/tmpfiles.conf \
    "$stage/usr/lib/tmpfiles.d/slurm-ml-container.conf"
install -D -m 0644 -t "$stage/usr/share/slurm-ml-container/recipes" packaging/recipes/*.def
install -D -m 0644 packaging/grafana/slurm-ml-container.json \
    "$stage/usr/share/slurm-ml-container/grafana/slurm-ml-container.json"
for m in ml-container.8 spank-ml-container.8; do
    install -D -m 0644 "packaging/man/$m" "$stage/usr/share/man/man8/$m"
    gzip -9n "$stage/usr/share/man/man8/$m"
done
install -D -m 0644 packaging/debian/copyright "$stage/usr/share/doc/$pkg/copyright"
mkdir -p "$stage/usr/share/doc/$pkg"
{
    echo "$pkg ($debver) unstable; urgency=medium"
    echo
    echo "  * Build for Slurm $slurm."
    echo
    echo " -- slurm-ml-container developers <ml-container-devel@example.org>  $(date -R -d @"${SOURCE_DATE_EPOCH:-0}")"
} | gzip -9n >"$stage/usr/share/doc/$pkg/changelog.gz"

mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$debver/" -e "s/@SLURM@/$slurm/" -e "s/@NEXT@/$next/" \
    -e "s/@SIZE@/$size/" packaging/debian/control >"$stage/DEBIAN/control"
printf '%s\n' /etc/slurm/ml-container.toml /etc/logrotate.d/slurm-ml-container \
    >"$stage/DEBIAN/conffiles"
for s in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$s" "$stage/DEBIAN/$s"
done
mkdir -p "$out"
deb="$out/${pkg}_${debver}_amd64.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
