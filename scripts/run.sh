#!/usr/bin/env bash
# `make run`: two simulated backends for the primary site (skondal), one for
# the secondary (verizon), and k2proxy with the repo's routes.toml in front,
# in plain HTTP on :8080 and HTTPS on :8443 (a development certificate).
# Ctrl-C stops everything this script started, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping ${#pids[@]} processes: ${pids[*]}"
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'stop; exit 0' INT TERM

"$bin/k2proxy" check --routes routes.toml

start_sim() { # name address
  "$bin/legacy-sim" --name "$1" --listen "$2" --workers 16 --service 20ms &
  pids+=($!)
}
start_sim skondal-1 127.0.0.1:9001
start_sim skondal-2 127.0.0.1:9002
start_sim verizon-1 127.0.0.1:9101

# Also HTTPS (h2 and HTTP/1.1) on a localhost certificate made on first run
# in certs/dev/ (git-ignored), with the CA to give curl.
"$bin/k2proxy" run --routes routes.toml --dev-tls 127.0.0.1:8443 &
pids+=($!)

# Ready when the admin listener answers; give up after 15 s.
for _ in $(seq 150); do
  curl -fsS -o /dev/null http://127.0.0.1:9901/healthz 2>/dev/null && break
  if ! kill -0 "${pids[-1]}" 2>/dev/null; then echo "k2proxy exited" >&2; exit 1; fi
  sleep 0.1
done

cat <<MSG

  k2proxy is up
    proxy    http://127.0.0.1:8080     try: curl -i localhost:8080/checkout/x
    https    https://localhost:8443    try: curl -i --http2 --cacert certs/dev/ca.pem https://localhost:8443/checkout/x
    admin    http://127.0.0.1:9901/    (live status page)   /status   /metrics   /healthz
    backends skondal (primary) 127.0.0.1:9001 127.0.0.1:9002, verizon (secondary) 127.0.0.1:9101
  Ctrl-C stops everything.

MSG
wait -n "${pids[@]}"
echo "a process exited; stopping the rest" >&2
