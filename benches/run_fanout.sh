#!/usr/bin/env bash
# Fan-out benchmark: fastws pinned to core 0 (one tokio worker), the load generator pinned to core 1.
# Usage: benches/run_fanout.sh [subscribers=1000] [seconds=10] [window=16]
# Needs a release build of fastws on PATH (`pip install .`, not an editable debug build). Loopback only;
# the run is bounded by [seconds] plus a 5 s drain, and both processes end with the script.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 20000
subscribers=${1:-1000}
seconds=${2:-10}
window=${3:-16}

cargo build --quiet --release --example fanout
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
taskset -c 0 fastws serve --host 127.0.0.1 --port "$port" --workers 1 --client-publish bench \
  --log-level warning &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2).close()" 2>/dev/null; then break; fi
  sleep 0.1
done
taskset -c 1 target/release/examples/fanout "ws://127.0.0.1:$port/" "$subscribers" "$seconds" "$window" "$server_pid"
