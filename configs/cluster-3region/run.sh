#!/usr/bin/env bash
# Runs a 3-region meshcast cluster on this machine: origins us, eu and ap in a full mesh and
# one edge per region (each lists its own region's origin first). Ctrl-C stops every node.
#
#   configs/cluster-3region/run.sh [path/to/meshcast]
#
# Without a path it builds the release binary first. Logs go to a temporary directory
# (printed). Then, for example:
#   ffmpeg -re -f lavfi -i testsrc=size=640x360:rate=30 -f lavfi -i sine \
#     -c:v libx264 -g 30 -c:a aac -f flv rtmp://127.0.0.1:2935/live/demo     # publish in us
#   ffplay http://127.0.0.1:9092/live/demo.flv                               # watch in ap
#   curl -s http://127.0.0.1:9092/api/v1/cluster                            # who serves whom
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-}
if [ -z "$bin" ]; then
  (cd "$here/../.." && cargo build --release --locked)
  bin="$here/../../target/release/meshcast"
fi
logs=$(mktemp -d /tmp/meshcast-3region.XXXXXX)
pids=()
stop() {
  if [ ${#pids[@]} -gt 0 ]; then kill "${pids[@]}" 2>/dev/null || true; fi
  wait || true
}
trap stop EXIT
trap 'exit 130' INT TERM
for node in origin-us origin-eu origin-ap edge-us edge-eu edge-ap; do
  "$bin" run --config "$here/$node.toml" >"$logs/$node.log" 2>&1 &
  pids+=($!)
done
echo "meshcast 3-region cluster running (PIDs ${pids[*]}); logs in $logs"
echo "publish: rtmp://127.0.0.1:2935|2936|2937/live/NAME (us|eu|ap)"
echo "watch:   http://127.0.0.1:9090|9091|9092/live/NAME.flv (edges us|eu|ap)"
wait -n "${pids[@]}" || true
echo "a node exited; stopping the cluster (see $logs)" >&2
