#!/usr/bin/env bash
# Overload, side by side: a legacy-sim of fixed capacity behind k2proxy with
# the default policy, and behind k2proxy with admission off (plain
# proxying), under open-loop load at 1x, 2x, 3x and 5x capacity with the
# holiday mix (20% purchase, 30% merchant, 30% admin, 20% customer service).
# Variants run interleaved at each load; each run gets a fresh sim and proxy.
#
# Env: LOADS ("1 2 3 5"), DURATION (15s), WORKERS (16), SERVICE (20ms),
#      TIMEOUT (5s, the clients' own timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
LOADS=${LOADS:-"1 2 3 5"} DURATION=${DURATION:-15s} WORKERS=${WORKERS:-16}
SERVICE=${SERVICE:-20ms} TIMEOUT=${TIMEOUT:-5s}
bin=target/release
out=results; mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
source scripts/lib.sh
service_ms=$(python3 -c "import sys; v='$SERVICE'; print(float(v[:-2]) if v.endswith('ms') else float(v[:-1])*1000)")
capacity=$(python3 -c "print($WORKERS * 1000 / $service_ms)")

run_one() { # variant load
  local variant=$1 load=$2
  local sim_port proxy_port admin_port
  sim_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)
  "$bin/legacy-sim" --listen "127.0.0.1:$sim_port" --workers "$WORKERS" --service "$SERVICE" >/dev/null &
  local sim_pid=$!
  python3 scripts/bench_routes.py "$work/routes.toml" "$proxy_port" "$admin_port" "$sim_port" 2 "$work/policy.toml" "$PWD"
  # The default policy; for the comparison, the same with admission off.
  python3 - "$work/policy.toml" "$variant" "$PWD" <<'PY'
import re, sys
policy, variant, repo = sys.argv[1:]
p = open(f"{repo}/policies/default.toml").read()
if variant == "admission-off":
    p = re.sub(r'(?ms)^\[admission\.kred\].*?(?=^\[)', '[admission.kred]\nmode = "off"\n\n', p)
open(policy, "w").write(p)
PY
  RUST_LOG=warn "$bin/k2proxy" run --routes "$work/routes.toml" 2>>"$out/overload-k2proxy.log" &
  local proxy_pid=$!
  pids=("$sim_pid" "$proxy_pid")
  wait_http "http://127.0.0.1:$admin_port/healthz" || { echo "k2proxy did not start" >&2; tail "$out/overload-k2proxy.log" >&2; exit 1; }
  local rate base="http://127.0.0.1:$proxy_port"
  rate=$(python3 -c "print(int($load * $capacity))")
  echo "== $variant at ${load}x capacity ($rate req/s for $DURATION)" >&2
  "$bin/loadtest" run --rate "$rate" --duration "$DURATION" --timeout "$TIMEOUT" \
    --mix "purchase=20=$base/checkout/pay" --mix "merchant=30=$base/api/invoices" \
    --mix "admin=30=$base/admin/users" --mix "customer_service=20=$base/cs/tickets" \
    --header "x-merchant-id: m-1" --json |
    python3 -c "import json,sys; d=json.load(sys.stdin); d.update(variant='$variant', load=$load, capacity=$capacity); print(json.dumps(d))" >> "$work/runs.jsonl"
  kill "$sim_pid" "$proxy_pid" 2>/dev/null || true
  wait "$sim_pid" "$proxy_pid" 2>/dev/null || true
  pids=()
}

for load in $LOADS; do
  for variant in k2proxy admission-off; do
    run_one "$variant" "$load"
  done
done
cp "$work/runs.jsonl" "$out/overload-$stamp.jsonl"

python3 - "$out/overload-$stamp.jsonl" "$out/overload-$stamp.md" "$WORKERS" "$SERVICE" "$DURATION" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
workers, service, duration = sys.argv[3:]
md = [f"Overload: legacy-sim {workers} workers x {service} (capacity {runs[0]['capacity']:.0f} req/s), open loop {duration} per run, mix 20/30/30/20",
      "", "| load | variant | purchase ok | purchase p99 ms | merchant ok | admin ok | cs ok | goodput / capacity | fast 503s | timeouts | refusal p99 ms |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
for r in runs:
    t = {x["name"]: x for x in r["targets"]}
    secs = r["elapsed_s"]
    ok = sum(x["outcomes"]["ok"] for x in r["targets"])
    shed = sum(x["outcomes"]["shed"] for x in r["targets"])
    timeouts = sum(x["outcomes"]["timeout"] for x in r["targets"])
    errors = sum(x["outcomes"]["error"] for x in r["targets"])
    cap_total = r["capacity"] * secs  # until the last answer came back
    refusal = max((x["shed_ms"]["p99"] for x in r["targets"] if x["outcomes"]["shed"]), default=0)
    pct = lambda n: f"{100*t[n]['success']:.1f}%"
    md.append(f"| {r['load']}x | {r['variant']} | {pct('purchase')} | {t['purchase']['ok_ms']['p99']:.0f} | {pct('merchant')} | {pct('admin')} | {pct('customer_service')} | {ok/cap_total:.2f} | {shed} | {timeouts + errors} | {refusal:.1f} |")
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
echo "wrote $out/overload-$stamp.jsonl and $out/overload-$stamp.md"
