#!/usr/bin/env python3
"""Fleet-wide rate limits, measured (`make bench-limits`): accuracy and
latency of one key's limit at 100, 1,000 and 10,000 req/s, fleet scope
against instance scope.

Three k2proxy instances (release build) share a redis-server and a
legacy-sim; the open-loop generator sends one merchant's requests spread
evenly over the three. The quota is half the offered rate: a fleet rule of
R/2 per second, or an instance rule of R/6 on each of the three (what an
operator would set without a shared store). Also the Redis-kill timeline:
Redis is killed 4 s into a 12 s run at 1,000 req/s and restarted at 8 s;
accepted requests per second show the fallback and the return.

Everything runs on loopback, bounded in time; the processes it starts are
stopped by their PIDs. Output: a Markdown table on stdout and in results/.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchlib import BIN, REPO, free_port, start_k2proxy, wait_port
RATES = [int(r) for r in os.environ.get("RATES", "100 1000 10000").split()]
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "10"))


def start_redis(port):
    p = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return p


def start_instance(workdir, i, backend, redis_port, scope, per_second):
    policy = f"""tiers = ["merchant"]
[admission.main]
mode = "off"
[rate_limit_store]
redis = "redis://127.0.0.1:{redis_port}/0"
fleet_size = 3
[[rate_limit]]
name = "quota-{scope}-{per_second}"
route = "api"
key = "header:x-merchant-id"
per_second = {per_second}
burst = {max(1, per_second // 10)}
scope = "{scope}"
"""
    return start_k2proxy(workdir / f"k2-{i}", backend,
                         'name = "api"\nmatch = { path_prefix = "/api/" }\ntier = "merchant"', policy)


def load(ports, rate, seconds, timeline=False):
    args = [str(BIN / "loadtest"), "run", "--rate", str(rate), "--duration", f"{seconds}s",
            "--header", "x-merchant-id: m-1", "--json", "--quiet"]
    for i, port in enumerate(ports):
        args += ["--mix", f"k{i}=1=http://127.0.0.1:{port}/api/x"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    return json.loads(out.stdout)


def stop(procs):
    for p in procs:
        p.kill()
        p.wait()


def summary(report, seconds):
    ok = sum(t["outcomes"]["ok"] for t in report["targets"])
    limited = sum(t["outcomes"]["rate_limited"] for t in report["targets"])
    other = sum(t["outcomes"][k] for t in report["targets"] for k in ("shed", "error", "timeout"))
    lat = report.get("all", {}).get("ok_ms") or {}
    return ok / seconds, limited, other, lat


def main():
    for tool in ("redis-server",):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            raise SystemExit(f"{tool} is missing: make test-deps")
    workdir = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True).stdout.strip())
    sim_port, redis_port = free_port(), free_port()
    sim = subprocess.Popen([str(BIN / "legacy-sim"), "--listen", f"127.0.0.1:{sim_port}",
                            "--workers", "512", "--service", "1ms", "--name", "b"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis = start_redis(redis_port)
    lines = ["| offered req/s | scope | quota | accepted req/s | accepted / quota | ok p50 ms | ok p99 ms | other than 200/429 |",
             "|---|---|---|---|---|---|---|---|"]
    try:
        for rate in RATES:
            for scope in ("instance", "fleet"):
                quota = rate // 2
                per_second = quota if scope == "fleet" else max(1, quota // 3)
                procs = [start_instance(workdir, i, sim_port, redis_port, scope, per_second) for i in range(3)]
                time.sleep(0.5)
                report = load([p[1] for p in procs], rate, SECONDS)
                stop([p[0] for p in procs])
                accepted, limited, other, lat = summary(report, SECONDS)
                lines.append(f"| {rate} | {scope} | {quota}/s | {accepted:.1f} | {accepted / quota:.3f} | "
                             f"{lat.get('p50', 0):.2f} | {lat.get('p99', 0):.2f} | {other} |")
                print(lines[-1], flush=True)
        # The Redis-kill timeline at 1,000 req/s, quota 500/s (fleet).
        procs = [start_instance(workdir, i, sim_port, redis_port, "fleet", 500) for i in range(3)]
        time.sleep(0.5)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=load([p[1] for p in procs], 1000, 12)))
        t.start()
        time.sleep(4)
        redis.kill()
        redis.wait()
        killed = time.time()
        time.sleep(4)
        redis = start_redis(redis_port)
        t.join()
        stop([p[0] for p in procs])
        timeline = result["r"]["timeline"]
        per_sec = [sum(s["tiers"][k]["ok"] for k in s["tiers"]) for s in timeline]
        other = sum(t["outcomes"][k] for t in result["r"]["targets"] for k in ("shed", "error", "timeout"))
        lines.append("")
        lines.append("Redis-kill timeline (1,000 req/s, fleet quota 500/s; Redis killed at 4 s, restarted at 8 s): "
                     "accepted per second " + ", ".join(str(n) for n in per_sec[:12])
                     + f"; answers other than 200/429: {other}")
        print(lines[-1])
    finally:
        stop([sim, redis])
    out = REPO / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (out / f"fleet-limits-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
