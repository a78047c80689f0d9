#!/usr/bin/env bash
# tests/cluster/include.sh 24.11, for the callers written before 26.05
# joined (demo.sh, benches/launch.sh): the include dir, then the trixie root.
exec bash "$(dirname "$0")/include.sh" 24.11
