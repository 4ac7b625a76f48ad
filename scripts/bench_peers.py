#!/usr/bin/env python3
"""k2proxy side by side with its peers, on loopback, interleaved.

  overhead  the same no-wait backend direct, through k2proxy (full default
            policy, rate limits off), a bare pingora proxy, nginx and HAProxy,
            all with 2 workers/threads: wrk saturation req/s, and p50/p99 at a
            fixed open-loop rate (loadtest) below saturation.
  instructions
            instructions per proxied request, k2proxy and bare pingora, under
            callgrind (valgrind): the overhead without the machine's noise.
  overload  a legacy-sim of fixed capacity behind k2proxy (default policy),
            HAProxy (per-tier set-priority-class, server maxconn, timeout
            queue) and nginx (no priority), open-loop mixed load at 1x, 2x, 3x,
            5x capacity (20% purchase, 30% merchant, 30% admin, 20% cs).
  failover  purchases at a steady rate; the primary backends start refusing
            connections mid-run: k2proxy (secondary site), HAProxy and nginx
            (backup servers). Failed purchases and time to recover.

Every measurement runs ROUNDS times, the targets interleaved (A B C A B C ...),
so machine drift hits all alike; medians are reported. Results go to
results/peers-<stamp>.md and .json.

  upgrade   one k2proxy replaced by a graceful upgrade under UPGRADE_LOAD
            (0.8x) of FLEET_WORKERS x FLEET_SERVICE (64 x lognormal(50ms,
            0.25) here), with and without [server] admission_state: what the
            new process refused while its limits climbed.
  fleet     N k2proxy behind an L4 balancer against N HAProxy (maxconn =
            workers / N), at FLEET_LOADS (3,5 by default; 0.8 checks that
            nothing is refused under capacity: the share of all requests
            refused is reported) (docs/admission.md, "Fleets").
  accesslog throughput with the access log on (the default level, stderr to a
            file) and off, K2PROXY_B with its log on, bare pingora, nginx
            with its access log on and off.
  edge      a slowloris client (ATTACK_CONNS connections from one address,
            a header line every 5 s, ATTACK_SECONDS; ATTACK_ADDRS addresses
            for a flood past max_connections) while purchases flow;
            k2proxy under ulimit -n ATTACK_NOFILE (docs/operations.md).

usage: bench_peers.py [overhead] [instructions] [overload] [failover] [fleet] [edge]
       (default: the first four)
env:   ROUNDS (3), OVERHEAD_ROUNDS (5), DURATION (8s), OVERLOAD_DURATION (10s), RATE (4000),
       LOADS (overload multiples, "1,2,3,5"), VARIANTS (overload proxies,
       "k2proxy,haproxy priority,nginx"; the fleet phase runs those of
       "k2proxy", "k2proxy B" and "haproxy priority" it lists), K2PROXY_B (a second k2proxy binary, say
       a build before a change: run as "k2proxy B" beside "k2proxy" in the
       overload, failover and fleet phases), KEEP_WORK (1: keep the scratch
       directory with every process's log, and each fleet run's report with
       its per-second timeline, per-instance limits, each second's serving
       site from every instance's /status and the CPU seconds of the backend
       and the proxies as fleet-<load>x-<N>-<variant>-round<r>.json),
       K2PROXY_B_POLICY (the policy file
       B reads instead of policies/default.toml: a change of default beside
       a change of code), K2PROXY_POLICY (the same for "k2proxy" in the
       fleet phase: two settings side by side with one binary), FLEET_LOG (RUST_LOG of the fleet's instances; "info",
       the default, keeps the access log on as users run it), FLEET_WARMUP
       (a discarded run of this length before each group of fleet runs, "3s";
       "0" for none), FLEET_WORKERS / FLEET_SERVICE (the backend: "10ms" or
       "lognormal(20ms, 0.5)"), FLEET_CLASSES (per-tier service times,
       "PREFIX=DIST;...", e.g. "/admin/=lognormal(80ms, 0.5);/cs/=40ms": the
       mix's paths are /checkout/, /api/, /admin/ and /cs/; the capacity
       is then the mix's), FLEET_MAXCONN ("down", the default: the
       oracle's maxconn is workers / N rounded down, as the issue defines
       it; "up": rounded up, a fleet total at or over the workers, which
       keeps the backend busier when N does not divide them)
"""

import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.join(REPO, "target/release")
BARE = os.path.join(BIN, "examples/bare_pingora")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
# The overhead runs are short and the machine's throughput drifts by ±10%
# between them: more rounds, and ratios taken within each round.
OVERHEAD_ROUNDS = int(os.environ.get("OVERHEAD_ROUNDS", str(max(ROUNDS, 5))))
DURATION = os.environ.get("DURATION", "8s")
OVERLOAD_DURATION = os.environ.get("OVERLOAD_DURATION", "10s")
RATE = int(os.environ.get("RATE", "4000"))
LOADS = [int(x) for x in os.environ.get("LOADS", "1,2,3,5").split(",")]
# K2PROXY_B: another k2proxy binary (a build before a change), run as the
# variant "k2proxy B" beside "k2proxy" in every phase: an A/B in one run.
K2PROXY_B = os.environ.get("K2PROXY_B")
K2PROXY_B_POLICY = os.environ.get("K2PROXY_B_POLICY")
K2PROXY_POLICY = os.environ.get("K2PROXY_POLICY")
VARIANTS = os.environ.get(
    "VARIANTS", "k2proxy," + ("k2proxy B," if K2PROXY_B else "") + "haproxy priority,nginx").split(",")
THREADS = 2
WORK = tempfile.mkdtemp(prefix="k2bench-")
PROCS = []


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(cmd, name):
    out = open(os.path.join(WORK, f"{name}.log"), "ab")
    p = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    PROCS.append(p)
    return p


def stop(p):
    """Ends a process this script started, by its PID: SIGINT, the fast stop
    of every process here (k2proxy's SIGTERM drains for 5 s first)."""
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in PROCS:
        PROCS.remove(p)


def stop_all():
    for p in list(PROCS):
        stop(p)


def wait_http(url, timeout=20.0, ok=lambda status: 200 <= status < 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            # The benches' HTTPS certificates are self-signed.
            ctx = ssl._create_unverified_context() if url.startswith("https") else None
            with urllib.request.urlopen(url, timeout=1, context=ctx) as r:
                if ok(r.status):
                    return True
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s; logs in {WORK}")


def sim(workers, service, name, control=False, classes=()):
    port = free_port()
    cmd = [f"{BIN}/legacy-sim", "--listen", f"127.0.0.1:{port}", "--workers", str(workers),
           "--service", service, "--name", name]
    cmd += [a for prefix, dist in classes for a in ("--class", f"{prefix}={dist}")]
    ctl = None
    if control:
        ctl = free_port()
        cmd += ["--control", f"127.0.0.1:{ctl}"]
    p = start(cmd, name)
    wait_http(f"http://127.0.0.1:{port}/health")
    return p, port, ctl


def fault(ctl, mode):
    urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{ctl}/_sim/fault?mode={mode}", method="POST"), timeout=2).read()


# --- the peers -------------------------------------------------------------

def k2proxy(primary, secondary=None, policy_edit=None, health_interval=None, wrap=(), binary=None, log_level="warn",
            per_client_cap=None, routes_edit=None, policy_file=None):
    """The repo's routes.toml and default policy (or `policy_file`), pointed
    at the bench's ports."""
    port, admin = free_port(), free_port()
    routes = open(f"{REPO}/routes.toml").read()
    policy = open(policy_file or f"{REPO}/policies/default.toml").read()
    if policy_edit:
        policy = policy_edit(policy)
    ppath = os.path.join(WORK, f"policy-{port}.toml")
    open(ppath, "w").write(policy)
    routes = re.sub(r"(?m)^listen = .*$", f'listen = ["127.0.0.1:{port}"]', routes)
    routes = re.sub(r"(?m)^admin = .*$", f'admin = "127.0.0.1:{admin}"', routes)
    routes = re.sub(r"(?m)^threads = .*$", f"threads = {THREADS}", routes)
    routes = re.sub(r"(?m)^policy = .*$", f'policy = "{ppath}"', routes)
    # The load generator is one address standing for thousands of shoppers:
    # lift the per-address connection cap (1 000 by default) unless the edge
    # phase measures it.
    if per_client_cap is None:
        routes = re.sub(r"(?m)^policy = (.*)$", r"policy = \1\nmax_connections_per_client = 1000000", routes, count=1)
    sec = secondary or [free_port()]
    sites = iter([f"backends = {json.dumps([f'127.0.0.1:{p}' for p in primary])}",
                  f"backends = {json.dumps([f'127.0.0.1:{p}' for p in sec])}"])
    routes = re.sub(r"(?m)^backends = .*$", lambda m: next(sites), routes)
    if secondary is None:
        # No secondary in this bench: drain it so it is never chosen.
        routes = routes.replace('role = "secondary"', 'role = "secondary"\nenabled = false')
    if health_interval:
        routes = re.sub(r'interval = "1s"', f'interval = "{health_interval}"', routes)
    if routes_edit:
        routes = routes_edit(routes)
    rpath = os.path.join(WORK, f"routes-{port}.toml")
    open(rpath, "w").write(routes)
    env = dict(os.environ, RUST_LOG=log_level)
    out = open(os.path.join(WORK, f"k2proxy-{port}.log"), "ab")
    p = subprocess.Popen([*wrap, binary or f"{BIN}/k2proxy", "run", "--routes", rpath], stdout=out, stderr=out,
                         stdin=subprocess.DEVNULL, env=env)
    PROCS.append(p)
    wait_http(f"http://127.0.0.1:{admin}/healthz")
    # Ready when the primary's backends are checked up.
    deadline = time.time() + 20
    while time.time() < deadline:
        s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=2))
        site = s["clusters"][0]["sites"][0]
        if all(b["health"] == "up" for b in site["backends"]):
            break
        time.sleep(0.05)
    return p, port


def no_rate_limits(policy):
    return re.sub(r"(?ms)^\[\[rate_limit\]\].*?(?=^\[|\Z)", "", policy)


def bare(upstream, wrap=(), tls=None):
    port = free_port()
    extra = ["--tls-cert", tls[0], "--tls-key", tls[1]] if tls else []
    p = start([*wrap, BARE, "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream}",
               "--threads", str(THREADS), *extra], f"bare-{port}")
    wait_http(f"{'https' if tls else 'http'}://127.0.0.1:{port}/checkout/x")
    return p, port


def nginx(primary, backup=(), extra_server="", http_extra="", wrap=(), access_log=False, tls=None):
    port = free_port()
    listen = f"127.0.0.1:{port}"
    if tls:
        # keepalive_requests: nginx closes a connection after 1 000 requests
        # by default (h2 too), and h2load does not reconnect.
        listen += (f" ssl http2;\n    ssl_certificate {tls[0]};\n    ssl_certificate_key {tls[1]};\n"
                   "    ssl_protocols TLSv1.2 TLSv1.3;\n    keepalive_requests 100000000")
    d = os.path.join(WORK, f"nginx-{port}")
    access_log = f"{d}/logs/access.log" if access_log else "off"
    os.makedirs(os.path.join(d, "logs"), exist_ok=True)
    servers = "".join(f"    server 127.0.0.1:{p} {extra_server};\n" for p in primary)
    servers += "".join(f"    server 127.0.0.1:{p} backup;\n" for p in backup)
    conf = f"""worker_processes {THREADS};
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log {access_log};
{http_extra}  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream be {{
{servers}    keepalive 128;
  }}
  server {{
    listen {listen};
    location / {{
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_read_timeout 30s;
    }}
  }}
}}
"""
    open(os.path.join(d, "nginx.conf"), "w").write(conf)
    p = start([*wrap, "nginx", "-p", d, "-c", os.path.join(d, "nginx.conf")], f"nginx-{port}")
    wait_http(f"{'https' if tls else 'http'}://127.0.0.1:{port}/checkout/x", ok=lambda s: True)
    return p, port


def haproxy(primary, backup=(), maxconn=None, priority=False, check=None):
    port = free_port()
    d = os.path.join(WORK, f"haproxy-{port}")
    os.makedirs(d, exist_ok=True)
    mc = f" maxconn {maxconn}" if maxconn else ""
    chk = f" check inter {check} fall 2 rise 2" if check else ""
    servers = "".join(f"  server p{i} 127.0.0.1:{p}{mc}{chk}\n" for i, p in enumerate(primary))
    servers += "".join(f"  server b{i} 127.0.0.1:{p}{mc}{chk} backup\n" for i, p in enumerate(backup))
    prio = ""
    if priority:
        # Lower class is served first; the queue wait is HAProxy's only
        # per-request deadline (one per backend, not per tier).
        prio = """  http-request set-priority-class int(1) if { path_beg /checkout/ }
  http-request set-priority-class int(2) if { path_beg /api/ }
  http-request set-priority-class int(3) if { path_beg /admin/ }
  http-request set-priority-class int(4) if { path_beg /cs/ }
"""
    conf = f"""global
  nbthread {THREADS}
  maxconn 8000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout queue 2s
  retries 2
  option redispatch
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{port}
{prio}  default_backend be
backend be
  http-reuse always
{servers}"""
    return run_haproxy(conf, d, port, f"haproxy-{port}")


def run_haproxy(conf, d, port, name):
    """Writes `conf` to `d`, starts HAProxy on it, waits for `port`."""
    path = os.path.join(d, "haproxy.cfg")
    open(path, "w").write(conf)
    p = start(["haproxy", "-db", "-f", path], name)
    wait_http(f"http://127.0.0.1:{port}/checkout/x", ok=lambda s: True)
    return p, port


# --- measurements ----------------------------------------------------------

def wrk(url):
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{DURATION}", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, int(errors.group(1)) if errors else 0


def loadtest_quick(url, rate, duration):
    out = subprocess.run([f"{BIN}/loadtest", "run", "--target", url, "--rate", str(rate),
                          "--duration", duration, "--timeout", "5s", "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


# The holiday mix: each tier's share (percent), the path prefix its
# requests take (for FLEET_CLASSES) and its requests in a loadtest scenario.
HOLIDAY_MIX = {
    "purchase": (20, "/checkout/", 'method = "POST"\npath = "/checkout/pay/{seq}"\nbody = \'{"amount": 1999}\'\n'),
    "merchant": (30, "/api/", 'path = "/api/orders?page={rand:20}"\nheaders = { x-merchant-id = "m-{rand:500}" }\n'),
    "admin": (30, "/admin/", 'path = "/admin/users/{rand:1000}"\n'),
    "customer_service": (20, "/cs/", 'path = "/cs/tickets/{rand:1000}"\n'),
}


def scenario_file(rate_x, capacity, duration, purchases_only=False):
    """A scenario for --target: the holiday mix at rate_x times capacity."""
    tiers = {name: (w, body) for name, (w, _, body) in HOLIDAY_MIX.items()
             if not purchases_only or name == "purchase"}
    text = f"""name = "bench"
seed = 7
timeout = "5s"
[load]
capacity = {capacity}
stages = [{{ duration = "{duration}", rate = "{rate_x}x" }}]
[mix]
"""
    text += "".join(f"{name} = {w}\n" for name, (w, _) in tiers.items())
    text += "".join(f"[tiers.{name}]\n{body}" for name, (_, body) in tiers.items())
    path = os.path.join(WORK, f"scenario-{rate_x}-{int(time.time()*1000)}.toml")
    open(path, "w").write(text)
    return path


def run_scenario(path, base):
    out_dir = path + ".out"
    r = subprocess.run([f"{BIN}/loadtest", "run", path, "--target", base, "--quiet", "--out", out_dir],
                       capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise RuntimeError(f"loadtest failed: {r.stderr}")
    return json.load(open(os.path.join(out_dir, "report.json")))


def med(xs):
    return statistics.median(xs) if xs else 0.0


def accesslog():
    """Throughput as users run k2proxy: the default log level (the access log
    on, stderr to a file), beside RUST_LOG=warn (no access log), K2PROXY_B
    with its access log on, and bare pingora."""
    log("== accesslog: k2proxy with its access log on and off, bare pingora")
    _, sim_port = sim(100000, "0ms", "fast")[:2]
    targets = {}
    _, targets["k2proxy, access log"] = k2proxy([sim_port], policy_edit=no_rate_limits, log_level="info")
    _, targets["k2proxy, RUST_LOG=warn"] = k2proxy([sim_port], policy_edit=no_rate_limits)
    if K2PROXY_B:
        _, targets["k2proxy B, access log"] = k2proxy([sim_port], policy_edit=no_rate_limits, log_level="info",
                                                      binary=K2PROXY_B)
    _, targets["bare pingora"] = bare(sim_port)
    _, targets["nginx, access log"] = nginx([sim_port], access_log=True)
    _, targets["nginx, no access log"] = nginx([sim_port])
    rows = {t: [] for t in targets}
    for rnd in range(1, OVERHEAD_ROUNDS + 1):
        for name, port in targets.items():
            rps, _ = wrk(f"http://127.0.0.1:{port}/checkout/x")
            rows[name].append(rps)
            log(f"round {rnd} {name:<24} {rps:>9.0f} req/s")
    stop_all()
    quiet = rows["k2proxy, RUST_LOG=warn"]
    nginx_quiet = rows["nginx, no access log"]
    md = [f"### Access log cost (wrk -t1 -c32 -d{DURATION}; {THREADS} threads; median of {OVERHEAD_ROUNDS} "
          "interleaved rounds; paired: the median of each round's own ratio)", "",
          "| target | req/s | vs the same proxy without its access log, paired |", "|---|---|---|"]
    for t, v in rows.items():
        base = nginx_quiet if t.startswith("nginx") else quiet
        md.append(f"| {t} | {med(v):.0f} | {med([x / y for x, y in zip(v, base)]):.2f} |")
    return rows, md


def overhead():
    log("== overhead: direct, k2proxy, bare pingora, nginx, haproxy")
    _, sim_port = sim(100000, "0ms", "fast")[:2]
    targets = {"direct": sim_port}
    _, targets["k2proxy"] = k2proxy([sim_port], policy_edit=no_rate_limits)
    _, targets["bare pingora"] = bare(sim_port)
    _, targets["nginx"] = nginx([sim_port])
    _, targets["haproxy"] = haproxy([sim_port])
    rows = {t: {"rps": [], "p50": [], "p99": [], "non2xx": 0} for t in targets}
    for rnd in range(1, OVERHEAD_ROUNDS + 1):
        for name, port in targets.items():
            url = f"http://127.0.0.1:{port}/checkout/x"
            rps, errors = wrk(url)
            rows[name]["rps"].append(rps)
            rows[name]["non2xx"] += errors
            log(f"round {rnd} {name:<13} {rps:>9.0f} req/s")
        for name, port in targets.items():
            r = loadtest_quick(f"http://127.0.0.1:{port}/checkout/x", RATE, DURATION)
            t = r["targets"][0]
            rows[name]["p50"].append(t["ok_ms"]["p50"])
            rows[name]["p99"].append(t["ok_ms"]["p99"])
            log(f"round {rnd} {name:<13} at {RATE}/s p50 {t['ok_ms']['p50']:.3f} ms p99 {t['ok_ms']['p99']:.3f} ms, success {t['success']:.4f}")
    stop_all()
    bare_rounds = rows["bare pingora"]["rps"]
    result = {t: {"rps": med(v["rps"]), "p50_ms": med(v["p50"]), "p99_ms": med(v["p99"]),
                  "rps_rounds": v["rps"], "non2xx": v["non2xx"],
                  # Each round's ratio to bare pingora measured seconds apart.
                  "vs_bare_paired": med([x / y for x, y in zip(v["rps"], bare_rounds)])}
              for t, v in rows.items()}
    n, b = result["nginx"]["rps"], result["bare pingora"]["rps"]
    md = [f"### Overhead (wrk -t1 -c32 -d{DURATION}; open loop {RATE} req/s for {DURATION}; "
          f"{THREADS} workers/threads each; median of {OVERHEAD_ROUNDS} interleaved rounds; "
          "paired: the median of each round's own ratio)", "",
          "| target | req/s | vs nginx | vs bare pingora | vs bare pingora, paired | p50 ms @ " + str(RATE) + "/s | p99 ms @ " + str(RATE) + "/s |",
          "|---|---|---|---|---|---|---|"]
    for t, v in result.items():
        md.append(f"| {t} | {v['rps']:.0f} | {v['rps']/n:.2f} | {v['rps']/b:.2f} | {v['vs_bare_paired']:.2f} | "
                  f"{v['p50_ms']:.3f} | {v['p99_ms']:.3f} |")
    return result, md


# Requests as wrk sends them (Host only), and as a merchant's SDK would.
REQUEST_SHAPES = {
    "wrk default (1 header)": [],
    "merchant SDK (6 headers)": ["User-Agent: merchant-sdk/2.3 (php 8.2)", "Accept: application/json",
                                 "Accept-Encoding: gzip", "Authorization: Bearer 3f9a0c1d2e",
                                 "X-Merchant-Id: m-1234"],
}


IDLE_S = 4


def callgrind_dump(p, out_file, part):
    """Dumps `p`'s counters (then zeroed) and returns the instructions in that part."""
    subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True, check=True)
    dump = out_file.replace("%p", str(p.pid)) + f".{part}"
    deadline = time.time() + 30
    while time.time() < deadline:
        if os.path.exists(dump):
            totals = [l for l in open(dump) if l.startswith(("summary:", "totals:"))]
            if totals:
                return int(totals[0].split()[1])
        time.sleep(0.2)
    sys.exit(f"bench_peers: callgrind wrote no {dump} within 30 s")


def instructions():
    """Instructions per proxied request under callgrind: exact where req/s on
    a shared 2-core machine moves ±10% between runs. User-space only (the
    kernel's share of each request, the same sockets for both, is not seen)."""
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            sys.exit(f"bench_peers: {tool} not found (make bench-peers installs valgrind)")
    log("== instructions per request under callgrind: k2proxy, bare pingora")
    _, sim_port = sim(100000, "0ms", "fast")[:2]
    result = {}
    for shape, headers in REQUEST_SHAPES.items():
        hargs = [a for h in headers for a in ("-H", h)]
        for name in ("k2proxy", "bare pingora"):
            out_file = os.path.join(WORK, f"cg-{len(result)}.%p.out")
            wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"]
            if name == "k2proxy":
                p, port = k2proxy([sim_port], policy_edit=no_rate_limits, wrap=wrap)
            else:
                p, port = bare(sim_port, wrap=wrap)
            url = f"http://127.0.0.1:{port}/checkout/x"
            subprocess.run(["wrk", "-t1", "-c8", "-d2s", *hargs, url], capture_output=True, check=True)
            subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, check=True)
            t0 = time.monotonic()
            out = subprocess.run(["wrk", "-t1", "-c8", f"-d{DURATION}", *hargs, url],
                                 capture_output=True, text=True, check=True).stdout
            n = int(re.search(r"(\d+) requests in", out).group(1))
            total = callgrind_dump(p, out_file, 1)
            loaded_s = time.monotonic() - t0
            # The same process idle for a while: what it spends per second
            # whatever the load (health checks, timers). Under callgrind it
            # serves ~1k req/s, so that work weighs ~20x more per request
            # than at saturation; the marginal figure leaves it out.
            t0 = time.monotonic()
            time.sleep(IDLE_S)
            idle = callgrind_dump(p, out_file, 2)
            idle_rate = idle / (time.monotonic() - t0)
            stop(p)
            marginal = (total - idle_rate * loaded_s) / n
            result.setdefault(shape, {})[name] = {
                "requests": n, "instructions_per_request": total / n,
                "idle_instructions_per_s": idle_rate, "marginal_instructions_per_request": marginal}
            log(f"{shape:<26} {name:<13} {total / n:>9.0f} instructions/request, "
                f"{marginal:>9.0f} marginal ({n} requests; idle {idle_rate:,.0f}/s)")
    md = [f"### Instructions per proxied request (callgrind, wrk -c8 -d{DURATION} after a 2 s warm-up; "
          "user space only)", "",
          "All: every instruction the process ran while loaded, over the requests served. "
          f"Marginal: less what the same process runs idle ({IDLE_S} s measured after the load) "
          "for as long as the load lasted: health checks and timers, whose share per request "
          "shrinks as the rate grows (callgrind serves ~1k req/s; a saturated proxy ~20x that).", "",
          "| request | k2proxy all | bare pingora all | bare / k2proxy | k2proxy marginal "
          "| bare pingora marginal | bare / k2proxy marginal |", "|---|---|---|---|---|---|---|"]
    for shape, r in result.items():
        k, b = r["k2proxy"]["instructions_per_request"], r["bare pingora"]["instructions_per_request"]
        km = r["k2proxy"]["marginal_instructions_per_request"]
        bm = r["bare pingora"]["marginal_instructions_per_request"]
        r["bare_over_k2proxy"] = b / k
        r["bare_over_k2proxy_marginal"] = bm / km
        md.append(f"| {shape} | {k:,.0f} | {b:,.0f} | {b / k:.3f} | {km:,.0f} | {bm:,.0f} | {bm / km:.3f} |")
    stop_all()
    return result, md


def overload():
    workers, service = 16, "20ms"
    capacity = 800
    log(f"== overload: legacy-sim {workers} workers x {service} (capacity {capacity}/s)")
    variants = VARIANTS
    runs = []
    for load in LOADS:
        for rnd in range(1, ROUNDS + 1):
            for v in variants:
                sp, sim_port, _ = sim(workers, service, "legacy")
                if v == "k2proxy":
                    pp, port = k2proxy([sim_port])
                elif v == "k2proxy B":
                    pp, port = k2proxy([sim_port], binary=K2PROXY_B)
                elif v == "haproxy priority":
                    pp, port = haproxy([sim_port], maxconn=workers, priority=True)
                else:
                    pp, port = nginx([sim_port])
                r = run_scenario(scenario_file(load, capacity, OVERLOAD_DURATION), f"http://127.0.0.1:{port}")
                stop(pp)
                stop(sp)
                t = {x["name"]: x for x in r["targets"]}
                a = r["all"]["outcomes"]
                fails = a["shed"] + a["error"] + a["rate_limited"] + a["timeout"]
                row = {
                    "load": load, "variant": v, "round": rnd,
                    "purchase_success": t["purchase"]["success"],
                    "purchase_p99_ms": t["purchase"]["ok_ms"]["p99"],
                    "merchant_p50_ms": t["merchant"]["ok_ms"]["p50"],
                    "success": {n: x["success"] for n, x in t.items()},
                    "goodput_share": a["ok"] / (capacity * r["elapsed_s"]),
                    "fast_failure_share": (fails - a["timeout"]) / fails if fails else 1.0,
                    "timeouts": a["timeout"],
                    "failures": fails,
                }
                runs.append(row)
                log(f"{load}x {v:<17} purchase {row['purchase_success']*100:6.2f}% p99 {row['purchase_p99_ms']:7.1f} ms, "
                    f"goodput {row['goodput_share']:.2f}x, timeouts {a['timeout']}")
                time.sleep(0.3)
    md = [f"### Overload (legacy-sim {workers} workers x {service} = {capacity} req/s; open loop {OVERLOAD_DURATION} per run; "
          "mix 20% purchase / 30% merchant / 30% admin / 20% customer service; client timeout 5s; "
          f"median of {ROUNDS} interleaved rounds)", "",
          "| load | proxy | purchase ok | purchase p99 ms | merchant ok | merchant p50 ms | admin ok | cs ok | goodput / capacity | failures fast (503) | timeouts |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for load in LOADS:
        for v in variants:
            rs = [r for r in runs if r["load"] == load and r["variant"] == v]
            ok = lambda tier: med([r["success"][tier] for r in rs]) * 100
            md.append(f"| {load}x | {v} | {ok('purchase'):.1f}% | {med([r['purchase_p99_ms'] for r in rs]):.0f} | "
                      f"{ok('merchant'):.1f}% | {med([r['merchant_p50_ms'] for r in rs]):.0f} | {ok('admin'):.1f}% | {ok('customer_service'):.1f}% | "
                      f"{med([r['goodput_share'] for r in rs]):.2f} | {med([r['fast_failure_share'] for r in rs])*100:.0f}% | "
                      f"{med([r['timeouts'] for r in rs]):.0f} |")
    return runs, md


def failover():
    log("== failover: primary refuses connections at 5 s under 200 purchases/s")
    variants = ["k2proxy"] + (["k2proxy B"] if K2PROXY_B else []) + ["haproxy backup", "nginx backup"]
    runs = []
    for rnd in range(1, ROUNDS + 1):
        for v in variants:
            p1, port1, ctl1 = sim(64, "5ms", "p1", control=True)
            p2, port2, ctl2 = sim(64, "5ms", "p2", control=True)
            s1, sport, _ = sim(64, "5ms", "s1")
            if v.startswith("k2proxy"):
                binary = K2PROXY_B if v == "k2proxy B" else None
                pp, port = k2proxy([port1, port2], secondary=[sport], binary=binary)
            elif v == "haproxy backup":
                pp, port = haproxy([port1, port2], backup=[sport], check="1s")
            else:
                pp, port = nginx([port1, port2], backup=[sport], extra_server="max_fails=1 fail_timeout=10s")
            path = scenario_file(200, 1, "15s", purchases_only=True)
            proc = subprocess.Popen([f"{BIN}/loadtest", "run", path, "--target", f"http://127.0.0.1:{port}",
                                     "--quiet", "--out", path + ".out"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(5.0)
            fault(ctl1, "refuse")
            fault(ctl2, "refuse")
            proc.wait(120)
            r = json.load(open(os.path.join(path + ".out", "report.json")))
            for p in (pp, p1, p2, s1):
                stop(p)
            failed_seconds = [s["second"] for s in r["timeline"]
                              if s["tiers"]["purchase"]["offered"] - s["tiers"]["purchase"]["ok"] > 0]
            failed = r["all"]["sent"] - r["all"]["outcomes"]["ok"]
            recover = (max(failed_seconds) + 1 - 5) if failed_seconds else 0
            runs.append({"variant": v, "round": rnd, "failed": failed, "sent": r["all"]["sent"],
                         "recovered_within_s": max(recover, 0)})
            log(f"round {rnd} {v:<15} failed purchases {failed} of {r['all']['sent']}, recovered within {max(recover, 0)} s")
    md = ["### Failover (200 purchases/s for 15 s; both primary backends refuse connections at 5 s; "
          "health checks every 1 s, fall 2 — as in routes.toml; median of rounds)", "",
          "| proxy | failed purchases | time to recover (s, 1 s resolution) |", "|---|---|---|"]
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        md.append(f"| {v} | {med([r['failed'] for r in rs]):.0f} (rounds: {', '.join(str(r['failed']) for r in rs)}) | "
                  f"{med([r['recovered_within_s'] for r in rs]):.0f} |")
    return runs, md


def l4(ports):
    """HAProxy in TCP mode, round-robin over `ports`: the L4 balancer in
    front of a fleet (per connection, as keepalived/IPVS or an NLB)."""
    port = free_port()
    d = os.path.join(WORK, f"l4-{port}")
    os.makedirs(d, exist_ok=True)
    servers = "".join(f"  server i{i} 127.0.0.1:{p}\n" for i, p in enumerate(ports))
    conf = f"""global
  nbthread {THREADS}
  maxconn 8000
defaults
  mode tcp
  timeout connect 1s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  balance roundrobin
{servers}"""
    return run_haproxy(conf, d, port, f"l4-{port}")


def serving_sites(admins):
    """Each k2proxy's serving site as /status shows it (limit, in flight,
    queue, what the limit learnt), or None."""
    out = []
    for a in admins:
        try:
            s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{a}/status", timeout=2))
            out.append(s["clusters"][0]["sites"][0])
        except (OSError, ValueError, KeyError, IndexError):
            out.append(None)
    return out


def cpu_seconds(pid):
    """User + system CPU seconds a process has used, from /proc (None once gone)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


FLEET_SIZES = [int(x) for x in os.environ.get("FLEET_SIZES", "1,2,3").split(",")]
def load_x(text):
    """A load in multiples of capacity: 3, or 0.8 (under capacity, where
    nothing may be refused)."""
    try:
        x = float(text)
    except ValueError:
        x = 0.0
    if not x > 0:
        sys.exit(f"FLEET_LOADS: {text!r} is not a positive multiple of capacity")
    return int(x) if x == int(x) else x


FLEET_LOADS = [load_x(x) for x in os.environ.get("FLEET_LOADS", "3,5").split(",")]
FLEET_LOG = os.environ.get("FLEET_LOG", "info")
# A discarded run of this length opens each group of runs ("0" for none):
# the first run after a size change was slower whichever binary ran it.
FLEET_WARMUP = os.environ.get("FLEET_WARMUP", "3s")
FLEET_MAXCONN = os.environ.get("FLEET_MAXCONN", "down")
KEEP_WORK = bool(os.environ.get("KEEP_WORK"))


def refusal_max_after(report, second):
    """The slowest refusal (any tier) in the report's timeline from `second`
    on, in ms; None when the loadtest predates per-second refusal times."""
    secs = report.get("timeline", [])[second:]
    vals = [t.get("shed_max_ms") for sec in secs for t in sec["tiers"].values() if t.get("shed")]
    if any(v is None for v in vals):
        return None
    return max(vals, default=0.0)


def oracle_maxconn(workers, n):
    """Each HAProxy's maxconn in a fleet of n: workers / n, rounded as
    FLEET_MAXCONN says."""
    if FLEET_MAXCONN not in ("down", "up"):
        sys.exit(f"FLEET_MAXCONN={FLEET_MAXCONN!r}: expected down or up")
    return max(1, -(-workers // n) if FLEET_MAXCONN == "up" else workers // n)


def mean_service_s(service, what="FLEET_SERVICE"):
    """The mean of a legacy-sim service time: "10ms", or "lognormal(10ms, 0.5)"
    (median and sigma: the mean is median x e^(sigma^2 / 2))."""
    m = re.fullmatch(r"\s*lognormal\(\s*([\d.]+)ms\s*,\s*([\d.]+)\s*\)\s*", service)
    if m:
        return float(m.group(1)) / 1000 * math.exp(float(m.group(2)) ** 2 / 2)
    m = re.fullmatch(r"\s*([\d.]+)ms\s*", service)
    if not m:
        sys.exit(f"{what}: {service!r}: expected e.g. 10ms or lognormal(10ms, 0.5)")
    return float(m.group(1)) / 1000


def fleet_classes(text):
    """FLEET_CLASSES: per-path service times for legacy-sim, "PREFIX=DIST;..."
    (e.g. "/admin/=lognormal(80ms, 0.5);/cs/=40ms"): a backend whose
    requests do not all cost the same. Each must be a prefix of a tier's path."""
    classes = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        prefix, sep, dist = item.partition("=")
        paths = [p for _, p, _ in HOLIDAY_MIX.values()]
        if not sep or not any(p.startswith(prefix) for p in paths):
            sys.exit(f"FLEET_CLASSES: {item!r}: expected PREFIX=DIST with PREFIX one of the mix's paths "
                     f"({', '.join(paths)})")
        mean_service_s(dist, f"FLEET_CLASSES: {item!r}")  # refused here, not by legacy-sim mid-run
        classes.append((prefix, dist))
    return classes


def mix_mean_service_s(service, classes):
    """The holiday mix's mean service time: each tier's requests cost their
    class's mean (the first prefix that matches, as legacy-sim picks) or the
    default service's."""
    def tier_mean(path):
        return next((mean_service_s(d) for p, d in classes if path.startswith(p)), mean_service_s(service))
    return sum(share / 100 * tier_mean(path) for share, path, _ in HOLIDAY_MIX.values())


def classes_text(classes):
    """FLEET_CLASSES as the log and the report name the backend."""
    return "".join(f", {p}={d}" for p, d in classes)


def fleet():
    """N k2proxy instances behind an L4 balancer in front of one backend,
    against N HAProxy instances with priority classes and maxconn = workers / N
    (the oracle that knows the worker count)."""
    workers, service = int(os.environ.get("FLEET_WORKERS", "8")), os.environ.get("FLEET_SERVICE", "10ms")
    classes = fleet_classes(os.environ.get("FLEET_CLASSES", ""))
    # legacy-sim's workers keep their schedule (loadtest/src/workers.rs), so
    # it serves its configured capacity; before, it served about 0.9 of it
    # and this said so. With FLEET_CLASSES the capacity is the holiday mix's
    # (a run that sheds the costly tiers can serve more than it).
    capacity = workers / mix_mean_service_s(service, classes)
    oracle_maxconn(workers, 1)  # a bad FLEET_MAXCONN is refused before any run
    log(f"== fleet: legacy-sim {workers} workers x {service}{classes_text(classes)} (capacity ~{capacity:.0f}/s), "
        f"instances {FLEET_SIZES}, loads {FLEET_LOADS}x")
    runs = []
    # VARIANTS picks among them: an A/B of two builds need not wait for the
    # oracle's runs.
    variants = tuple(v for v in ("k2proxy",) + (("k2proxy B",) if K2PROXY_B else ()) + ("haproxy priority",)
                     if v in VARIANTS)
    if not variants:
        sys.exit(f"VARIANTS={','.join(VARIANTS)!r}: the fleet phase runs k2proxy, k2proxy B or haproxy priority")
    for load in FLEET_LOADS:
        for rnd in range(1, ROUNDS + 1):
            for n in FLEET_SIZES:
                # The order rotates by round: the first run after a size
                # change was slower whichever binary ran it (the same binary
                # as k2proxy and k2proxy B: p50 449 against 157 ms at 5x).
                shift = (rnd - 1) % len(variants)
                order = variants[shift:] + variants[:shift]
                warm = FLEET_WARMUP not in ("", "0", "0s")
                for i, v in enumerate((order[0],) + order if warm else order):
                    warmup = warm and i == 0
                    sp, sim_port, _ = sim(workers, service, "legacy", classes=classes)
                    procs, ports, admins = [], [], []
                    for _ in range(n):
                        if v.startswith("k2proxy"):
                            b = v == "k2proxy B"
                            p, port = k2proxy([sim_port], binary=K2PROXY_B if b else None, log_level=FLEET_LOG,
                                              policy_file=K2PROXY_B_POLICY if b else K2PROXY_POLICY)
                            admins.append(int(re.search(r'admin = "127.0.0.1:(\d+)"', open(
                                os.path.join(WORK, f"routes-{port}.toml")).read()).group(1)))
                        else:
                            p, port = haproxy([sim_port], maxconn=oracle_maxconn(workers, n), priority=True)
                        procs.append(p)
                        ports.append(port)
                    lb, lb_port = l4(ports)
                    seconds = []
                    stop_sampling = threading.Event()

                    def sample():
                        # Each second: every instance's serving site and
                        # the CPU the backend and the proxies used so far
                        # (kept with KEEP_WORK: a 5x round that lost 9%
                        # had the backend's latency double at 8 in flight
                        # for 8 workers, and nothing said whether the
                        # machine's two cores were the cause).
                        while not stop_sampling.wait(1.0):
                            seconds.append({"sites": serving_sites(admins), "cpu_s": {
                                "backend": cpu_seconds(sp.pid),
                                "proxies": [cpu_seconds(p.pid) for p in procs]}})
                    t = threading.Thread(target=sample, daemon=True)
                    t.start()
                    duration = FLEET_WARMUP if warmup else OVERLOAD_DURATION
                    r = run_scenario(scenario_file(load, capacity, duration), f"http://127.0.0.1:{lb_port}")
                    stop_sampling.set()
                    t.join()
                    limits = [[x["limit"] if x else None for x in s["sites"]] for s in seconds]
                    # Seconds in which each instance claimed latency over its
                    # ceiling (/status learnt.claim): the instance short of
                    # its share in a split, or one starving at `min`.
                    claimed = [sum(1 for s in seconds if i < len(s["sites"]) and s["sites"][i]
                                   and (s["sites"][i].get("learnt") or {}).get("claim"))
                               for i in range(n)] if v != "haproxy priority" else []
                    for p in [lb, *procs, sp]:
                        stop(p)
                    if KEEP_WORK and not warmup:
                        # Each run's report (per-second timeline) and the
                        # instances' limits, for a round worth a second look.
                        name = f"fleet-{load}x-{n}-{v.replace(' ', '-')}-round{rnd}"
                        json.dump({"report": r, "limits": limits, "seconds": seconds}, open(os.path.join(WORK, name + ".json"), "w"))
                    if warmup:
                        log(f"{load}x {n} x {v:<17} warm-up run ({duration}), not counted")
                        time.sleep(0.3)
                        continue
                    tt = {x["name"]: x for x in r["targets"]}
                    a = r["all"]["outcomes"]
                    row = {"load": load, "instances": n, "variant": v, "round": rnd,
                           "purchase_success": tt["purchase"]["success"],
                           "purchase_p50_ms": tt["purchase"]["ok_ms"]["p50"],
                           "purchase_p99_ms": tt["purchase"]["ok_ms"]["p99"],
                           # Without the first second (a cold start's climb:
                           # every run starts its proxies anew).
                           "purchase_p99_after_1s_ms": tt["purchase"]["ok_after_first_second_ms"]["p99"],
                           "goodput_share": a["ok"] / (capacity * r["elapsed_s"]),
                           # Every tier's refusals and failures: under
                           # capacity (FLEET_LOADS=0.8) none is the target.
                           "refused_share": (a["shed"] + a["rate_limited"] + a["timeout"] + a["error"])
                           / max(1, sum(a.values())),
                           # How fast a refusal came (from the intended
                           # send time), any tier: the issue wants every
                           # one under 100 ms.
                           # (None: nothing refused with a 503, as HAProxy's
                           # queue timeouts are not.)
                           "refusal_p99_ms": r["all"]["shed_ms"]["p99"] if a["shed"] else None,
                           # The slowest of them: "every refusal".
                           "refusal_max_ms": r["all"]["shed_ms"]["max"] if a["shed"] else None,
                           # ...and after the first second (each run
                           # starts its proxies anew): a cold start's
                           # onset apart from a peak that holds.
                           "refusal_max_after_1s_ms": refusal_max_after(r, 1) if a["shed"] else None,
                           "limits": limits,
                           "claimed_seconds": claimed}
                    runs.append(row)
                    seen = [x for ls in limits[len(limits) // 2:] for x in ls if x is not None]
                    log(f"{load}x {n} x {v:<17} purchase {row['purchase_success']*100:6.2f}% "
                        f"p50 {row['purchase_p50_ms']:6.1f} p99 {row['purchase_p99_ms']:7.1f} "
                        f"(after 1 s {row['purchase_p99_after_1s_ms']:6.1f}) ms, "
                        f"goodput {row['goodput_share']:.2f}x, refused {row['refused_share']*100:.2f}% "
                        f"(p99 {row['refusal_p99_ms'] or 0:.0f} ms), "
                        f"limits {min(seen, default='-')}..{max(seen, default='-')}"
                        + (f", claimed {'/'.join(map(str, claimed))} s of {len(seconds)}" if claimed else ""))
                    time.sleep(0.3)
    def refusal_p99(rs):
        shed = [r["refusal_p99_ms"] for r in rs if r["refusal_p99_ms"] is not None]
        return f"{max(shed):.0f}" if shed else "-"

    def refusal_max(rs, key="refusal_max_ms"):
        # Runs of an older report lack it.
        shed = [r[key] for r in rs if r.get(key) is not None]
        return f"{med(shed):.0f} ({max(shed):.0f})" if shed else "-"

    md = [f"### Fleet (legacy-sim {workers} workers x {service}{classes_text(classes)}, "
          f"~{capacity:.0f} req/s; N instances behind an "
          f"L4 round-robin balancer; open loop {OVERLOAD_DURATION} per run; holiday mix; median of {ROUNDS} rounds)", "",
          "| load | instances | proxy | purchase ok | purchase p50 ms | purchase p99 ms | purchase p99 ms after the first second | goodput / capacity | refused, all tiers (worst round) | refusal p99 ms (worst round) | slowest refusal ms, median of rounds (worst) | slowest refusal ms after the first second | per-instance limit (second half) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for load in FLEET_LOADS:
        for n in FLEET_SIZES:
            for v in variants:
                rs = [r for r in runs if r["load"] == load and r["instances"] == n and r["variant"] == v]
                seen = [x for r in rs for ls in r["limits"][len(r["limits"]) // 2:] for x in ls if x is not None]
                lim = f"{min(seen)}-{max(seen)}" if seen else f"maxconn {oracle_maxconn(workers, n)}"
                md.append(f"| {load}x | {n} | {v} | {med([r['purchase_success'] for r in rs]) * 100:.1f}% | "
                          f"{med([r['purchase_p50_ms'] for r in rs]):.0f} | {med([r['purchase_p99_ms'] for r in rs]):.0f} | "
                          f"{med([r['purchase_p99_after_1s_ms'] for r in rs]):.0f} | "
                          f"{med([r['goodput_share'] for r in rs]):.2f} | "
                          f"{max(r['refused_share'] for r in rs) * 100:.2f}% | "
                          f"{refusal_p99(rs)} | {refusal_max(rs)} | "
                          f"{refusal_max(rs, 'refusal_max_after_1s_ms')} | {lim} |")
    return runs, md


# --- a graceful upgrade mid-load -------------------------------------------

UPGRADE_LOAD = os.environ.get("UPGRADE_LOAD", "0.8")
UPGRADE_AT_S = float(os.environ.get("UPGRADE_AT_S", "6"))


def upgrade_once(workers, service, capacity, keep_state):
    """One k2proxy under open-loop load at UPGRADE_LOAD, replaced at
    UPGRADE_AT_S by a process started with --upgrade (SIGQUIT hands it the
    listeners): what the new process refused, with and without
    [server] admission_state (the old one's limits, written every second)."""
    sp, sim_port, _ = sim(workers, service, "legacy")
    state = os.path.join(WORK, f"admission-{time.time_ns()}.json")
    edit = (lambda r: r.replace('policy = "', f'admission_state = "{state}"\npolicy = "', 1)) if keep_state else None
    old, port = k2proxy([sim_port], log_level="info", routes_edit=edit)
    rpath = os.path.join(WORK, f"routes-{port}.toml")
    duration = UPGRADE_AT_S + 8
    result = {}
    t = threading.Thread(target=lambda: result.update(run_scenario(
        scenario_file(load_x(UPGRADE_LOAD), capacity, f"{duration:g}s"), f"http://127.0.0.1:{port}")))
    t.start()
    time.sleep(UPGRADE_AT_S)
    new_log = os.path.join(WORK, f"k2proxy-{port}-new.log")
    new = subprocess.Popen([f"{BIN}/k2proxy", "run", "--upgrade", "--routes", rpath],
                           stdout=subprocess.DEVNULL, stderr=open(new_log, "ab"), stdin=subprocess.DEVNULL,
                           env=dict(os.environ, RUST_LOG="info"))
    PROCS.append(new)
    time.sleep(0.5)
    old.send_signal(signal.SIGQUIT)
    t.join()
    for p in (new, old, sp):
        stop(p)
    lines = [l for l in open(new_log, errors="replace") if "k2proxy::access" in l]
    refused = sum('outcome="shed"' in l for l in lines)
    # The new process's purchases: how long they took, queue included.
    purchase_ms = sorted(float(m.group(1)) for l in lines if 'tier="purchase"' in l and 'outcome="proxied"' in l
                         for m in [re.search(r"duration_ms=([\d.]+)", l)] if m)
    a = result["all"]["outcomes"]
    return {"keep_state": keep_state, "new_requests": len(lines), "new_refused": refused,
            "new_purchase_p99_ms": purchase_ms[int(0.99 * (len(purchase_ms) - 1))] if purchase_ms else None,
            "new_purchases_refused": sum('outcome="shed"' in l and 'tier="purchase"' in l for l in lines),
            "refused_share_all": (a["shed"] + a["rate_limited"] + a["timeout"] + a["error"]) / max(1, sum(a.values())),
            "errors": a["error"] + a["timeout"],
            "resumed": sum("resumed from the admission state" in l for l in open(new_log, errors="replace"))}


def upgrade():
    """A graceful upgrade of one k2proxy mid-load (UPGRADE_LOAD x capacity of
    FLEET_WORKERS x FLEET_SERVICE), with and without [server] admission_state,
    interleaved ROUNDS times: requests the new process refused."""
    workers, service = int(os.environ.get("FLEET_WORKERS", "64")), os.environ.get(
        "FLEET_SERVICE", "lognormal(50ms, 0.25)")
    capacity = workers / mean_service_s(service)
    log(f"== upgrade at {UPGRADE_AT_S:g} s under {UPGRADE_LOAD}x: legacy-sim {workers} x {service}")
    runs = []
    for rnd in range(1, ROUNDS + 1):
        for keep in ((False, True) if rnd % 2 else (True, False)):
            r = upgrade_once(workers, service, capacity, keep)
            r["round"] = rnd
            runs.append(r)
            log(f"round {rnd} {'with' if keep else 'without'} admission_state: the new process refused "
                f"{r['new_refused']} of {r['new_requests']} ({r['new_purchases_refused']} purchases; "
                f"purchase p99 {r['new_purchase_p99_ms']} ms; {r['resumed']} sites resumed); errors {r['errors']}")
    md = [f"### Graceful upgrade mid-load (legacy-sim {workers} x {service}, {UPGRADE_LOAD}x, "
          f"upgrade at {UPGRADE_AT_S:g} s; {ROUNDS} rounds)", "",
          "| admission_state | refused by the new process (each round) | of its requests | its purchases refused "
          "| its purchase p99 ms | client errors |",
          "|---|---|---|---|---|---|"]
    for keep in (False, True):
        rs = [r for r in runs if r["keep_state"] == keep]
        each = lambda k: ", ".join(f"{r[k]:.0f}" if isinstance(r[k], float) else str(r[k]) for r in rs)
        md.append(f"| {'set' if keep else 'not set'} | {each('new_refused')} | {each('new_requests')} | "
                  f"{each('new_purchases_refused')} | {each('new_purchase_p99_ms')} | {sum(r['errors'] for r in rs)} |")
    return runs, md


# --- the edge: a slowloris client ------------------------------------------

ATTACK_CONNS = int(os.environ.get("ATTACK_CONNS", "5000"))
ATTACK_SECONDS = float(os.environ.get("ATTACK_SECONDS", "40"))
ATTACK_NOFILE = int(os.environ.get("ATTACK_NOFILE", "4096"))
# Client addresses of the attack (127.0.0.2, .3, ...): 1 is a slowloris from
# one machine; more spread it past max_connections_per_client, a flood that
# meets max_connections.
ATTACK_ADDRS = int(os.environ.get("ATTACK_ADDRS", "1"))


def probe_loop(port, seconds, out):
    """A purchase every 100 ms on a fresh connection (its own process, so the
    attacker's event loop cannot slow it): (ok, ms) per probe into `out`."""
    end = time.monotonic() + seconds
    res = []
    while time.monotonic() < end:
        t0 = time.monotonic()
        ok = False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.settimeout(5)
                c.sendall(b"GET /checkout/probe HTTP/1.1\r\nhost: k2.test\r\nconnection: close\r\n\r\n")
                ok = c.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            pass
        res.append((ok, (time.monotonic() - t0) * 1000))
        time.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))
    out.put(res)


def open_fds(pid):
    """Open files of `pid` and its children (nginx's workers)."""
    pids = [pid]
    try:
        pids += [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        pass
    n = 0
    for q in pids:
        try:
            n += len(os.listdir(f"/proc/{q}/fd"))
        except OSError:
            pass
    return n


async def slowloris(port, pid, conns, seconds):
    """`conns` connections from ATTACK_ADDRS addresses, each sending a request line and
    then one header line every 5 s, reopened (after 1 s) when the proxy
    closes them; meanwhile `probe_loop` in another process. Bounded:
    everything stops after `seconds`."""
    import asyncio
    import multiprocessing
    end = time.monotonic() + seconds
    lived, held = [], [0]

    async def attacker(source):
        while time.monotonic() < end:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            except OSError:
                await asyncio.sleep(1.0)
                continue
            opened = time.monotonic()
            held[0] += 1
            try:
                w.write(b"GET /checkout/slow HTTP/1.1\r\nhost: k2.test\r\n")
                k = 0
                while time.monotonic() < end:
                    try:
                        left = min(5.0, max(0.01, end - time.monotonic()))
                        data = await asyncio.wait_for(r.read(4096), timeout=left)
                        if not data:
                            lived.append(time.monotonic() - opened)
                            break
                    except asyncio.TimeoutError:
                        w.write(f"x-{k}: y\r\n".encode())
                        k += 1
            except (OSError, ConnectionError):
                lived.append(time.monotonic() - opened)
            finally:
                held[0] -= 1
                w.close()
            await asyncio.sleep(1.0)

    out = multiprocessing.Queue()
    prober = multiprocessing.Process(target=probe_loop, args=(port, seconds, out))
    prober.start()
    tasks = [asyncio.ensure_future(attacker(f"127.0.0.{2 + i % ATTACK_ADDRS}")) for i in range(conns)]
    top, most_held, held_late = 0, 0, 0
    while time.monotonic() < end - 1:
        try:
            top = max(top, open_fds(pid))
        except OSError:
            pass
        most_held = max(most_held, held[0])
        held_late = held[0]
        await asyncio.sleep(1.0)
    await asyncio.gather(*tasks, return_exceptions=True)
    probes = out.get()
    prober.join()
    ok = [ms for good, ms in probes if good]
    return {"attack_held_max": most_held, "attack_held_late": held_late, "attack_closed": len(lived),
            "attack_lifetime_p50_s": round(statistics.median(lived), 2) if lived else None,
            "probe_success": len(ok) / max(1, len(probes)), "probes": len(probes),
            "probe_p50_ms": pct(ok, 50), "probe_p99_ms": pct(ok, 99), "max_fds": top}


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * q / 100))], 1)


def edge():
    """A slowloris client against k2proxy (and K2PROXY_B, a build before a
    change, side by side), each under `ulimit -n ATTACK_NOFILE`."""
    import asyncio
    variants = [("k2proxy", None)] + ([("k2proxy B", K2PROXY_B)] if K2PROXY_B else []) + [("nginx", "nginx")]
    log(f"== edge: slowloris, {ATTACK_CONNS} connections from {ATTACK_ADDRS} address(es) for {ATTACK_SECONDS:.0f} s, "
        f"k2proxy under ulimit -n {ATTACK_NOFILE}")
    runs = []
    for rnd in range(1, ROUNDS + 1):
        for name, binary in variants:
            sp, sim_port, _ = sim(8, "1ms", "legacy")
            wrap = ("prlimit", f"--nofile={ATTACK_NOFILE}")
            if binary == "nginx":
                # nginx's equivalent of header_timeout; it has no per-client
                # limit on connections whose request is not read yet.
                p, port = nginx([sim_port], http_extra="  client_header_timeout 10s;\n", wrap=wrap)
            else:
                p, port = k2proxy([sim_port], binary=binary, wrap=wrap, per_client_cap="default")
            r = asyncio.run(slowloris(port, p.pid, ATTACK_CONNS, ATTACK_SECONDS))
            r.update(variant=name, round=rnd)
            runs.append(r)
            log(f"{name:<10} probes ok {r['probe_success']*100:5.1f}% p50 {r['probe_p50_ms']} p99 {r['probe_p99_ms']} ms; "
                f"attack held max {r['attack_held_max']} late {r['attack_held_late']}, closed {r['attack_closed']} "
                f"(lifetime p50 {r['attack_lifetime_p50_s']}); max fds {r['max_fds']}")
            stop(p)
            stop(sp)
    md = [f"### Edge: slowloris ({ATTACK_CONNS} connections from {ATTACK_ADDRS} address(es), a header line every 5 s, "
          f"reopened 1 s after a close, {ATTACK_SECONDS:.0f} s; a purchase every 100 ms from another address; "
          f"k2proxy under ulimit -n {ATTACK_NOFILE}; median of {ROUNDS} rounds)", "",
          "| proxy | purchases ok | purchase p50 / p99 ms | attack connections held (max / near the end) | attack connections closed by the proxy | their lifetime p50 s | max open fds |",
          "|---|---|---|---|---|---|---|"]
    for name, _ in variants:
        rs = [r for r in runs if r["variant"] == name]
        f = lambda k: med([r[k] for r in rs if r[k] is not None]) if any(r[k] is not None for r in rs) else None
        md.append(f"| {name} | {f('probe_success') * 100:.1f}% | {f('probe_p50_ms')} / {f('probe_p99_ms')} | "
                  f"{f('attack_held_max')} / {f('attack_held_late')} | {f('attack_closed')} | {f('attack_lifetime_p50_s')} | {f('max_fds')} |")
    return runs, md


def wrk_args(url, args):
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{DURATION}", *args, url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, int(errors.group(1)) if errors else 0


def h2load(url):
    """HTTP/2 req/s: 8 connections, 4 streams each (32 at once, as wrk's
    32 connections), for DURATION. More streams than the backend needs make
    k2proxy's admission hold the excess (the limit settles near 20 for this
    no-wait backend): a measure of admission, not of HTTP/2."""
    out = subprocess.run(["h2load", "-t1", "-c8", "-m4", "-D", DURATION.rstrip("s"), url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [^,]+, ([\d.]+) req/s", out).group(1))
    ok = re.search(r"(\d+) succeeded, (\d+) failed", out)
    failed = int(ok.group(2)) if ok else -1
    proto = re.search(r"Application protocol: (\S+)", out)
    return rps, failed, proto.group(1) if proto else "?"


def tls():
    """TLS: new handshakes per second (wrk with `connection: close`: every
    request a new TLS connection), keep-alive HTTPS req/s over HTTP/1.1 (wrk)
    and HTTP/2 (h2load), for k2proxy (access log on, as users run it, and
    off), bare pingora on the same TLS stack (its own rustls listener) and
    nginx, all on one ECDSA P-256 certificate; interleaved rounds."""
    log("== tls: handshakes/s and keep-alive HTTPS req/s (h1, h2): k2proxy, bare pingora, nginx")
    for tool in ("h2load", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"bench_peers: {tool} not found (make bench-peers installs it)")
    d = os.path.join(WORK, "tls")
    os.makedirs(d, exist_ok=True)
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "30", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    _, sim_port = sim(100000, "0ms", "fast")[:2]

    def with_tls(port):
        block = f'\n[[server.tls]]\nlisten = "127.0.0.1:{port}"\ncert = "{cert}"\nkey = "{key}"\n'
        return lambda routes: re.sub(r"(?m)^(\[clusters\.)", lambda m: block + "\n" + m.group(1), routes, count=1)

    targets, plain = {}, {}
    for name, level in (("k2proxy", "info"), ("k2proxy, log off", "warn")):
        tport = free_port()
        _, plain[name] = k2proxy([sim_port], policy_edit=no_rate_limits, log_level=level,
                                 routes_edit=with_tls(tport))
        wait_http(f"https://127.0.0.1:{tport}/checkout/x")
        targets[name] = tport
    _, targets["bare pingora"] = bare(sim_port, tls=(cert, key))
    _, plain["bare pingora"] = bare(sim_port)
    _, targets["nginx"] = nginx([sim_port], tls=(cert, key))
    # The same processes in clear text (nginx aside): what k2proxy costs over
    # bare pingora without TLS, to tell it from what TLS costs.
    kinds = ("handshakes", "h1", "h2", "clear")
    rows = {t: {k: [] for k in kinds} for t in targets}
    failures = {t: 0 for t in targets}
    for rnd in range(1, ROUNDS + 1):
        for name, port in targets.items():
            url = f"https://127.0.0.1:{port}/checkout/x"
            hs, e1 = wrk_args(url, ["-H", "Connection: close"])
            h1, e2 = wrk_args(url, [])
            h2, e3, proto = h2load(url)
            clear = wrk_args(f"http://127.0.0.1:{plain[name]}/checkout/x", [])[0] if name in plain else 0.0
            failures[name] += e1 + e2 + max(e3, 0)
            for k, v in zip(kinds, (hs, h1, h2, clear)):
                rows[name][k].append(v)
            log(f"round {rnd} {name:<16} {hs:>8.0f} handshakes/s {h1:>8.0f} h1 req/s {h2:>8.0f} h2 req/s ({proto})"
                f" {clear:>8.0f} clear req/s")
    stop_all()
    bare_rows = rows["bare pingora"]
    result = {t: {**{k: med(v[k]) for k in kinds},
                  **{f"{k}_vs_bare_paired": med([x / y for x, y in zip(v[k], bare_rows[k])]) for k in kinds},
                  "rounds": v, "failures": failures[t]}
              for t, v in rows.items()}
    md = [f"### TLS (ECDSA P-256, TLS 1.3; wrk -t1 -c32 -d{DURATION}, with `Connection: close` for handshakes; "
          f"h2load -t1 -c8 -m4 -D {DURATION}; {THREADS} workers/threads each; median of {ROUNDS} interleaved "
          "rounds; vs bare pingora: the median of each round's own ratio)", "",
          "| target | handshakes/s | vs bare | HTTPS h1 req/s | vs bare | HTTPS h2 req/s | vs bare | clear h1 req/s | vs bare | failed |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for t, v in result.items():
        clear = f"{v['clear']:.0f} | {v['clear_vs_bare_paired']:.2f}" if t in plain else "- | -"
        md.append(f"| {t} | {v['handshakes']:.0f} | {v['handshakes_vs_bare_paired']:.2f} | {v['h1']:.0f} | "
                  f"{v['h1_vs_bare_paired']:.2f} | {v['h2']:.0f} | {v['h2_vs_bare_paired']:.2f} | {clear} | {v['failures']} |")
    return result, md


def main():
    phases = sys.argv[1:] or ["overhead", "instructions", "overload", "failover"]
    for tool in ("nginx", "haproxy", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"bench_peers: {tool} not found (make bench-peers installs it)")
    os.makedirs(os.path.join(REPO, "results"), exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = os.path.join(REPO, "results", f"peers-{stamp}")
    all_json, all_md = {}, [f"## k2proxy and its peers ({stamp}, {os.cpu_count()} cores)", ""]
    try:
        for phase in phases:
            data, md = {"overhead": overhead, "instructions": instructions, "overload": overload,
                        "failover": failover, "fleet": fleet, "edge": edge,
                        "accesslog": accesslog, "tls": tls, "upgrade": upgrade}[phase]()
            all_json[phase] = data
            all_md += md + [""]
            print("\n".join(md) + "\n", flush=True)
            # Written after every phase: a later failure keeps what was measured.
            json.dump(all_json, open(base + ".json", "w"), indent=2)
            open(base + ".md", "w").write("\n".join(all_md))
    finally:
        stop_all()
    print(f"wrote {base}.md and {base}.json")
    if KEEP_WORK:
        print(f"kept {WORK} (every process's log)")
    else:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
