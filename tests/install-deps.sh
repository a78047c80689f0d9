#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian 12 machine
# (run as root). The Slurm 24.11 / Apptainer root is built separately, and
# cached, by tests/cluster/rootfs.sh.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client libslurm-dev munge \
    debootstrap libclang-dev valgrind iproute2 util-linux procps \
    ca-certificates charliecloud-runtime squashfs-tools squashfuse busybox-static \
    lintian dpkg-dev xz-utils \
    prometheus-node-exporter prometheus \
    >/dev/null
# The packages' own daemons are not used: the tests run their own clusters.
