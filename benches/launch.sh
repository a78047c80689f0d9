#!/usr/bin/env bash
# Launch overhead of the plugin, printed side by side in one run,
# on a throwaway 2-node Slurm 24.11 cluster with Apptainer 1.4.5:
#   bare         srun -N2 -n4 /bin/true
#   hand-written srun -N2 -n4 apptainer exec <same binds> demo.sif /bin/true
#   plugin       srun -N2 -n4 --ml-container=demo /bin/true
#                (failure.capture_stderr at its default: stderr through a pipe)
#   no-capture   the same with failure.capture_stderr = 0 (stderr inherited)
# RUNS (default 10) rounds of the four, order rotating; medians. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

{ read -r inc; read -r root; } < <(bash tests/cluster/include-24.11.sh)
SLURM_INCLUDE_DIR=$inc cargo build --quiet --release --lib --target-dir target/cluster/24.11-release
cargo build --quiet --release --bin ml-container-launch

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
mkdir -p "$stage/etc/slurm/plugstack.conf.d" "$stage/usr/local/bin" "$stage/usr/libexec/slurm-ml-container"
install -m 0755 target/release/ml-container-launch "$stage/usr/libexec/slurm-ml-container/"
cp plugstack/ml-container.conf "$stage/etc/slurm/plugstack.conf.d/"
cp tests/cluster/demo-inside.sh "$stage/usr/local/bin/mlc-demo"
cat >"$stage/usr/local/bin/mlc-bench" <<'INNER'
#!/bin/bash
# Rounds of the three variants, in an order that rotates every round, so
# drift on a busy machine (page cache, other load) hits all three alike;
# medians per variant, and the median of the per-round differences.
set -euo pipefail
RUNS=${RUNS:-10}
/usr/local/bin/mlc-demo >/dev/null
mkdir -p /shared/data
as_user() { runuser -u mluser -- env -C /home/mluser "$@"; }
img=/opt/containers/ml-frameworks/demo.sif
run() {
    case $1 in
        bare) as_user srun -N2 -n4 /bin/true ;;
        hand) as_user srun -N2 -n4 apptainer exec --bind /shared/data:/data "$img" /bin/true ;;
        plugin | nocap) as_user srun -N2 -n4 --ml-container=demo /bin/true ;;
    esac
}
# The site config of the variant (read per step by srun and slurmstepd),
# put in place before the timed run.
prep() {
    case $1 in
        nocap) cp /etc/slurm/mlc-nocap.toml /etc/slurm/ml-container.toml ;;
        *) cp /etc/slurm/mlc-cap.toml /etc/slurm/ml-container.toml ;;
    esac
}
# "WALL_MS SRUN_CPU_MS" of one run (srun's own user+system time: the
# plugin's srun-side work shows there, free of the nodes' noise). A failed
# run would time an error path: stop instead.
ms() {
    local TIMEFORMAT='%R %U %S' t
    prep "$1"
    t=$({ time run "$1" >/dev/null 2>&1; } 2>&1) || { echo "bench: the $1 run failed" >&2; return 1; }
    awk '{ printf "%d %.1f\n", $1 * 1000, ($2 + $3) * 1000 }' <<<"$t"
}
# One unmeasured round, output shown, warms the page cache and the daemons.
for v in bare hand plugin nocap; do prep $v; run $v; done
declare -A all cpu
order=(bare hand plugin nocap)
diffs=()
capdiffs=()
for ((i = 0; i < RUNS; i++)); do
    declare -A t=()
    for ((k = 0; k < 4; k++)); do
        v=${order[$(((i + k) % 4))]}
        read -r wall c < <(ms "$v")
        [[ -n $wall ]] || exit 1
        t[$v]=$wall
        all[$v]+="$wall "
        cpu[$v]+="$c "
    done
    diffs+=($((t[plugin] - t[hand])))
    capdiffs+=($((t[plugin] - t[nocap])))
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
bare=$(median <<<"${all[bare]}")
hand=$(median <<<"${all[hand]}")
plug=$(median <<<"${all[plugin]}")
diff=$(median <<<"${diffs[*]}")
printf '%-14s %8s %14s   (%s rounds, order rotating)\n' variant median "srun cpu" "$RUNS"
for v in bare hand plugin nocap; do
    name=${v/hand/hand-written}
    name=${name/nocap/no-capture}
    printf '%-14s %6s ms %11s ms\n' "$name" "$(median <<<"${all[$v]}")" \
        "$(median <<<"${cpu[$v]}")"
done
awk -v h="$hand" -v p="$plug" -v d="$diff" 'BEGIN {
    printf "plugin / hand-written = %.3f (medians: added %+.1f %%)\n", p / h, (p - h) * 100 / h
    printf "per-round difference plugin - hand-written: median %+d ms (%+.1f %%)\n", d, d * 100 / h
}'
# The mean difference with its 95 % confidence interval (normal
# approximation): on a 2-core machine one srun varies by tens of ms, so
# the interval says whether the plugin's cost is told apart from noise.
printf '%s\n' "${diffs[@]}" | awk -v h="$hand" '
    { n++; s += $1; q += $1 * $1 }
    END {
        m = s / n; sd = sqrt((q - n * m * m) / (n - 1)); ci = 1.96 * sd / sqrt(n)
        printf "per-round difference plugin - hand-written: mean %+.1f ms +- %.1f (95 %% CI) = %+.1f %% +- %.1f %%\n", m, ci, m * 100 / h, ci * 100 / h
    }'
# Capture on (plugin) against off (no-capture), the same way.
capdiff=$(median <<<"${capdiffs[*]}")
awk -v h="$hand" -v d="$capdiff" 'BEGIN {
    printf "per-round difference capture on - off: median %+d ms (%+.1f %%)\n", d, d * 100 / h
}'

printf '%s\n' "${capdiffs[@]}" | awk -v h="$hand" '
    { n++; s += $1; q += $1 * $1 }
    END {
        m = s / n; sd = sqrt((q - n * m * m) / (n - 1)); ci = 1.96 * sd / sqrt(n)
        printf "per-round difference capture on - off: mean %+.1f ms +- %.1f (95 %% CI) = %+.1f %% +- %.1f %%\n", m, ci, m * 100 / h, ci * 100 / h
    }'
# The plugin's own time, as its callbacks log it (SlurmdDebug=verbose, set
# for all three variants alike): mean per call, and per step and node with
# 2 tasks per node (init + init_post_opt + 2 x (task_init + task_post_fork + task_exit)).
grep -h 'ml-container: slurm_spank_[a-z_]* took [0-9]* us' /var/log/slurm/slurmd-n*.log |
    sed 's/.*ml-container: \(slurm_spank_[a-z_]*\) took \([0-9]*\) us.*/\1 \2/' | awk -v h="$hand" '
    { s[$1] += $2; n[$1]++ }
    END {
        printf "plugin callbacks in slurmstepd (mean per call):"
        for (k in s) { m[k] = s[k] / n[k]; printf " %s %.0f us", k, m[k] }
        step = m["slurm_spank_init"] + m["slurm_spank_init_post_opt"] + 2 * (m["slurm_spank_task_init"] + m["slurm_spank_task_post_fork"] + m["slurm_spank_task_exit"])
        printf "\nplugin time per step and node: %.2f ms (%.2f %% of hand-written)\n", step / 1000, step / 10 / h
    }'
INNER
chmod 0755 "$stage/usr/local/bin/mlc-demo" "$stage/usr/local/bin/mlc-bench"
echo '[runtime]
binds = ["/shared/data:/data"]' >"$stage/etc/slurm/mlc-cap.toml"
printf '[runtime]\nbinds = ["/shared/data:/data"]\n[failure]\ncapture_stderr = 0\n' >"$stage/etc/slurm/mlc-nocap.toml"
cp "$stage/etc/slurm/mlc-cap.toml" "$stage/etc/slurm/ml-container.toml"
echo 'SlurmdDebug=verbose' >"$stage/etc/slurm/slurm.conf.extra"

unshare --mount --pid --fork --kill-child -- bash tests/cluster/cluster.sh \
    "$root" 2 target/cluster/24.11-release/release/libslurm_ml_container.so "$stage" \
    /usr/bin/env RUNS="${RUNS:-10}" bash ${BENCH_TRACE:+-x} /usr/local/bin/mlc-bench 2>&1 | grep -v '^munged\|^READY'
