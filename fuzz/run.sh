#!/usr/bin/env bash
# Runs one fuzz target for a while: fuzz/run.sh TARGET SECONDS
#
# Installs cargo-fuzz (pinned) into a cache directory when missing, seeds the
# target's corpus when it is empty, and exits non-zero when the fuzzer finds
# a crash (the input is then under fuzz/artifacts/TARGET/). libFuzzer's own
# output goes to target/fuzz-TARGET.log. Needs only the
# stable toolchain: RUSTC_BOOTSTRAP=1 lets it take the -Z sanitizer flags
# that cargo-fuzz passes.
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2

die() { echo "fuzz/run.sh: $*" >&2; exit 2; }

[[ $# -eq 2 ]] || die "usage: fuzz/run.sh TARGET SECONDS"
target=$1
seconds=$2
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "SECONDS must be a positive integer, got '$seconds'"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -f $here/fuzz_targets/$target.rs ]] ||
    die "no target '$target' (have: $(cd "$here/fuzz_targets" && ls -- *.rs | sed 's/\.rs$//' | tr '\n' ' '))"

# Kept outside the tree so that every checkout and CI run reuses one build.
root=${CARGO_FUZZ_ROOT:-/var/cache/slurm-ml-container/cargo-fuzz-$CARGO_FUZZ_VERSION}
if [[ ! -x $root/bin/cargo-fuzz ]]; then
    echo "fuzz/run.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION into $root (a few minutes, once)" >&2
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$root"
fi
export PATH="$root/bin:$PATH"

# Little-endian integer of $2 bytes, as raw bytes on stdout.
le() {
    local n=$1 width=$2 i
    for ((i = 0; i < width; i++)); do
        printf "\\x$(printf %02x $(((n >> (8 * i)) & 255)))"
    done
}
zeros() { head -c "$1" /dev/zero; }

# Seed for the sif target: the smallest sound SIF (see src/sif.rs for the
# layout): header, a one-entry descriptor table right after it, and a primary
# squashfs partition holding just a superblock that uses 96 bytes.
seed_sif() {
    local descroff=128 desclen=585 sblen=96
    local dataoff=$((descroff + desclen))
    {
        printf '#!/usr/bin/env run-singularity\n'; zeros 1     # launch, 32
        printf 'SIF_MAGIC'; zeros 1                             # magic, 10
        printf '01'; zeros 1; printf '02'; zeros 1              # version, arch
        zeros 16                                                # uuid
        le 0 8; le 0 8                                          # ctime, mtime
        le 0 8; le 1 8                                          # dfree, dtotal
        le $descroff 8; le $desclen 8                           # descriptor table
        le $dataoff 8; le $sblen 8                              # data section
        # descriptor: DataPartition, used, id 1, group 1, no link
        le $((0x4004)) 4; le 1 1; le 1 4; le $((0xf0000001)) 4; le 0 4
        le $dataoff 8; le $sblen 8; le $sblen 8                 # offset, size, padded
        zeros 32                                                # times, uid, gid
        zeros 128                                               # name
        le 1 4; le 2 4; printf '02'; zeros 1; zeros 373         # squashfs, primary
        # squashfs 4.0 superblock, bytes_used = 96
        printf 'hsqs'; zeros 24; le 4 2; le 0 2; zeros 8; le $sblen 8; zeros 48
    } >"$1/minimal.sif"
}

# Seed for the catalog target: a small catalog using every field.
seed_catalog() {
    cat >"$1/catalog.toml" <<'TOML'
version = 1

[[image]]
name = "pytorch"
tag = "2.1"
path = "ml-frameworks/pytorch-2.1.sif"
sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
size = 1114112
default = true
aliases = ["nvcr.io/nvidia/pytorch:24.01-py3"]
description = "PyTorch"
labels = { cuda = "12.1", pytorch = "2.1" }
added = 2024-01-15T10:00:00Z

[[image]]
name = "pytorch"
tag = "2.2"
path = "/opt/containers/ml-frameworks/pytorch-2.2.sif"
added = "2024-03-01T00:00:00+01:00"
TOML
}

# Seeds for the options target: the first byte picks the option (its index
# in options::OPTIONS), the rest is the value as slurmstepd receives it.
seed_options() {
    printf '\x00pytorch:2.1' >"$1/image"
    printf '\x01/data:/data:ro,/scratch' >"$1/mounts"
    printf '\x02/workspace' >"$1/workdir"
    printf '\x03auto' >"$1/gpus"
    printf '\x04off' >"$1/dist"
    printf '\x05' >"$1/tmpfs"
    printf '\x00demo\nFORGED line' >"$1/newline"
}

# Seeds for the pin target: the handoff as srun writes it
# (ML_CONTAINER_HANDOFF, src/handoff.rs), with and without a pin.
seed_pin() {
    cat >"$1/handoff.json" <<'JSON'
{"version":1,"pin":{"reference":"pytorch","source":"catalog","name":"pytorch","tag":"2.1","path":"/opt/containers/ml-frameworks/pytorch-2.1.sif","size":1114112,"catalog_size":1114112,"sha256":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},"srun_argv":["srun","-N2","--ml-container=pytorch","python3","train.py"]}
JSON
    printf '{"version":1,"pin":null,"srun_argv":[]}' >"$1/nopin.json"
}

cd "$here"
corpus=corpus/$target
mkdir -p "$corpus"
if [[ -z $(ls -A "$corpus") ]] && declare -F "seed_$target" >/dev/null; then
    "seed_$target" "$corpus"
fi

# libFuzzer prints a line for every new coverage point (close to a megabyte
# a minute): that goes to a log file, and the terminal (or CI) gets one line,
# or the log's end when the fuzzer failed.
log=$here/../target/fuzz-$target.log
mkdir -p "$(dirname "$log")"
echo "fuzz/run.sh: fuzzing $target for $seconds s (libFuzzer's output: target/fuzz-$target.log)"
# -timeout: an input that takes seconds is a hang in a parser of a few KiB.
status=0
RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$corpus" -- \
    -max_total_time="$seconds" -timeout=10 >"$log" 2>&1 || status=$?
if [[ $status != 0 ]]; then
    tail -n 80 "$log" >&2
    echo "fuzz/run.sh: $target failed (exit $status); a crashing input is under fuzz/artifacts/$target/" >&2
    exit "$status"
fi
echo "fuzz/run.sh: $target: $(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1 || true), no crash"
