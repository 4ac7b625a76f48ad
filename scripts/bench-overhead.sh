#!/usr/bin/env bash
# Proxy overhead: the same legacy-sim (no service time, effectively no worker
# limit) reached directly and through k2proxy, measured with wrk, interleaved
# A B A B … so that machine drift hits every target alike.
#
# Env: ROUNDS (3), DURATION (10s), CONNS (32), WRK_THREADS (1), PROXY_THREADS (2),
#      VARIANTS ("k2proxy=target/release/k2proxy"): space-separated name=binary
#      pairs, to compare builds side by side (e.g. two allocators).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10s} CONNS=${CONNS:-32}
WRK_THREADS=${WRK_THREADS:-1} PROXY_THREADS=${PROXY_THREADS:-2}
VARIANTS=${VARIANTS:-k2proxy=target/release/k2proxy}
out=results; mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

source scripts/lib.sh

sim_port=$(free_port)
target/release/legacy-sim --listen "127.0.0.1:$sim_port" --workers 100000 --service 0ms >/dev/null &
pids+=($!)
wait_http "http://127.0.0.1:$sim_port/health"

declare -A url=([direct]="http://127.0.0.1:$sim_port/checkout/x")
targets=(direct)
for v in $VARIANTS; do
  name=${v%%=*} bin=${v#*=}
  proxy_port=$(free_port) admin_port=$(free_port)
  # The repo's own routes and default policy, pointed at the bench's ports.
  python3 scripts/bench_routes.py "$work/$name.toml" "$proxy_port" "$admin_port" "$sim_port" "$PROXY_THREADS" "$PWD/policies/default.toml" "$PWD"
  RUST_LOG=warn "$bin" run --routes "$work/$name.toml" 2>"$out/$name-overhead.log" &
  pids+=($!)
  wait_http "http://127.0.0.1:$admin_port/healthz" || { echo "$name did not start:" >&2; cat "$out/$name-overhead.log" >&2; exit 1; }
  url[$name]="http://127.0.0.1:$proxy_port/checkout/x"
  targets+=("$name")
done

ms() { # wrk prints 812.00us, 1.20ms or 1.01s
  local v=$1
  case $v in
    *us) awk -v x="${v%us}" 'BEGIN{printf "%.3f", x/1000}';;
    *ms) awk -v x="${v%ms}" 'BEGIN{printf "%.3f", x}';;
    *s)  awk -v x="${v%s}" 'BEGIN{printf "%.3f", x*1000}';;
  esac
}
json="$out/overhead-$stamp.json"
echo "[" > "$json"
first=1
for round in $(seq "$ROUNDS"); do
  for target in "${targets[@]}"; do
    res=$(wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency "${url[$target]}")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$res")
    p50=$(ms "$(awk '$1=="50%" {print $2}' <<<"$res")")
    p99=$(ms "$(awk '$1=="99%" {print $2}' <<<"$res")")
    errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$res" | tr '\n' ' ')
    printf 'round %s %-10s %10s req/s  p50 %7s ms  p99 %7s ms %s\n' "$round" "$target" "$rps" "$p50" "$p99" "$errs"
    [ $first = 1 ] || echo "," >> "$json"; first=0
    printf '{"round":%s,"target":"%s","rps":%s,"p50_ms":%s,"p99_ms":%s}' "$round" "$target" "$rps" "$p50" "$p99" >> "$json"
  done
done
echo "]" >> "$json"

python3 - "$json" "$out/overhead-$stamp.md" "$CONNS" "$DURATION" "$PROXY_THREADS" "${targets[@]}" <<'PY'
import json, statistics, sys
rows = json.load(open(sys.argv[1]))
conns, duration, threads, targets = sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
med = {t: {k: statistics.median(r[k] for r in rows if r["target"] == t) for k in ("rps", "p50_ms", "p99_ms")} for t in targets}
d = med["direct"]
md = [f"Proxy overhead: wrk -c{conns} -d{duration}, k2proxy threads={threads}, median of {len(rows)//len(targets)} interleaved rounds",
      "", "| target | req/s | p50 ms | p99 ms | req/s vs direct | p99 vs direct |", "|---|---|---|---|---|---|"]
for t in targets:
    m = med[t]
    md.append(f"| {t} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {m['rps']/d['rps']:.2f} | {m['p99_ms']/d['p99_ms']:.2f} |")
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n" + "\n".join(md))
PY
echo "wrote $json and $out/overhead-$stamp.md"
