#!/usr/bin/env bash
# The GPU check (tests/gpu.rs), on a machine with an NVIDIA GPU and nvcc,
# as root; never in CI (no GPU there):
#
#   tests/gpu/run.sh DEBDIR GPU_TEST_BINARY IMAGE.sif
#
# DEBDIR holds the Apptainer 1.4.5 .deb and its FUSE/squashfuse .debs
# (unpacked into /: docs/DESIGN.md, Apptainer facts); GPU_TEST_BINARY is
# `cargo test --test gpu --no-run`'s executable, built on any x86-64
# Debian 12; IMAGE is any small SIF (the test clusters' busybox image).
set -euo pipefail
cd "$(dirname "$0")/../.."
debs=$1 test_bin=$2 image=$3
for f in "$debs"/*.deb; do dpkg -x "$f" /; done
ldconfig
# Unprivileged Apptainer mounts SIF images with squashfuse.
chmod 0666 /dev/fuse
id mlgpu >/dev/null 2>&1 || useradd -m mlgpu
bin=/tmp/mlc-gpu-bin
mkdir -p "$bin" && chmod 0755 "$bin"
nvcc=$(command -v nvcc || true)
for c in /usr/local/cuda*/bin/nvcc; do
    [[ -n $nvcc ]] && break
    [[ -x $c ]] && nvcc=$c
done
[[ -n $nvcc ]] || { echo "gpu/run.sh: no nvcc (PATH, /usr/local/cuda*/bin)" >&2; exit 1; }
"$nvcc" -o "$bin/device_count" tests/gpu/device_count.cu
chmod 0755 "$bin/device_count"
apptainer --version
"$bin/device_count"
MLC_GPU_IMAGE=$image MLC_GPU_BIN=$bin MLC_GPU_USER=mlgpu \
    "$test_bin" --ignored --nocapture --test-threads=1
