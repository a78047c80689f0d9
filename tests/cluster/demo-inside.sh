#!/bin/bash
# Runs inside node n1 of the demo cluster, as root (see demo.sh).
set -euo pipefail
as_user() { runuser -u mluser -- env -C /home/mluser "$@"; }

echo "demo: building a 1 MB busybox image with apptainer"
as_user sh -c 'rm -rf /tmp/demo-sandbox && mkdir -p /tmp/demo-sandbox/bin &&
    mkdir -p /tmp/demo-sandbox/etc && touch /tmp/demo-sandbox/etc/passwd /tmp/demo-sandbox/etc/group &&
    cp /bin/busybox /tmp/demo-sandbox/bin/ &&
    for c in sh echo hostname cat ls id true; do ln -s busybox /tmp/demo-sandbox/bin/$c; done &&
    echo "this is the demo image" >/tmp/demo-sandbox/MARKER &&
    apptainer -s build /tmp/demo.sif /tmp/demo-sandbox/ >/dev/null'
mkdir -p /opt/containers/ml-frameworks
install -m 0644 /tmp/demo.sif /opt/containers/ml-frameworks/demo.sif

# A bare "sh": srun resolves it to the host's /usr/bin/sh, which the busybox
# image lacks; the plugin looks the command up inside the image instead.
cmd=(srun -N2 -n4 --ml-container=demo sh -c
     'echo "rank $RANK of $WORLD_SIZE on $(hostname), master $MASTER_ADDR:$MASTER_PORT: $(cat /MARKER)"')
echo "demo: as mluser: ${cmd[*]}"
as_user "${cmd[@]}"
echo "demo: what the plugin saw on each node:"
grep -h 'ml-container:' /var/log/slurm/slurmd-n*.log | sed 's/^/  /'
