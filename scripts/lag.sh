#!/usr/bin/env bash
# The load generator's own send lag at 10,000 requests/s: three runs of 10 s
# against a separate legacy-sim with no service time (a fast target, so any
# lag is the generator's). Its p99 must stay under 1 ms.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin/legacy-sim" --listen "127.0.0.1:$port" --workers 100000 --service 0ms >/dev/null &
sim=$!
trap 'kill $sim 2>/dev/null' EXIT
sleep 0.5
for round in 1 2 3; do
  "$bin/loadtest" run --target "http://127.0.0.1:$port/x" --rate 10000 --duration 10s --timeout 5s | head -1
done
