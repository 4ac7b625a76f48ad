#!/usr/bin/env python3
"""Leaving a fleet, measured (`make bench-drain`): k2proxy's SIGTERM against
nginx's graceful stop (SIGQUIT), under 200 purchases/s.

Each proxy runs in front of a legacy-sim (16 workers x 20 ms). The open-loop
generator sends requests to the checkout route at 200/s for 10 s; 2 s in, the proxy is
told to stop. An L4 balancer needs a moment to notice a node leaving
(k2proxy's /healthz turns 503 at once and its listeners keep accepting for
`drain_delay`, 5 s by default); the table counts the purchases that failed
among those sent in the 4 s after the signal, while a balancer would still be
sending, and the time the process took to exit. Loopback only, bounded in
time; the processes it starts are stopped by their PIDs.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlib import BIN, REPO, free_port, start_k2proxy, wait_port
WINDOW_S = 4
SIGNAL_AT_S = 2
RUN_S = 10


def k2proxy(work, backend):
    return start_k2proxy(work, backend, 'name = "checkout"\nmatch = { path_prefix = "/checkout/" }\ntier = "purchase"',
                         'tiers = ["purchase"]\n', threads=2)


def nginx(work, backend):
    port = free_port()
    (work / "logs").mkdir(exist_ok=True)
    (work / "nginx.conf").write_text(f"""worker_processes 2;
daemon off;
pid {work}/nginx.pid;
error_log {work}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  upstream be {{ server 127.0.0.1:{backend}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
    p = subprocess.Popen(["nginx", "-p", str(work), "-c", str(work / "nginx.conf")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p, port


def healthz(admin):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=1).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def run(name, proc, port, stop_signal, admin=None):
    gen = subprocess.Popen(
        [str(BIN / "loadtest"), "run", "--rate", "200", "--duration", f"{RUN_S}s", "--json", "--quiet",
         "--mix", f"purchase=1=http://127.0.0.1:{port}/checkout/pay", "--timeout", "5s"],
        stdout=subprocess.PIPE, text=True)
    time.sleep(SIGNAL_AT_S)
    signalled = time.time()
    proc.send_signal(stop_signal)
    flipped = None
    if admin is not None:
        while time.time() - signalled < 1 and flipped is None:
            if healthz(admin) == 503:
                flipped = time.time() - signalled
            time.sleep(0.005)
    try:
        proc.wait(timeout=30)
        exited = time.time() - signalled
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        exited = None
    report = json.loads(gen.communicate(timeout=60)[0])
    window = report["timeline"][SIGNAL_AT_S:SIGNAL_AT_S + WINDOW_S]
    sent = sum(s["tiers"]["purchase"]["offered"] for s in window)
    failed = sum(s["tiers"]["purchase"][k] for s in window for k in ("error", "timeout", "shed"))
    return (f"| {name} | {sent} | {failed} | "
            f"{'%.0f ms' % (flipped * 1000) if flipped is not None else '—'} | "
            f"{'%.1f s' % exited if exited is not None else 'did not exit in 30 s'} |")


def main():
    rows = ["| proxy | purchases sent in the 4 s after the signal | of them failed | /healthz 503 after | process exited after |",
            "|---|---|---|---|---|"]
    rounds = int(os.environ.get("ROUNDS", "2"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sim_port = free_port()
        sim = subprocess.Popen([str(BIN / "legacy-sim"), "--listen", f"127.0.0.1:{sim_port}",
                                "--workers", "16", "--service", "20ms", "--name", "b"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(sim_port)
        try:
            for r in range(rounds):
                p, listen, admin = k2proxy(tmp / f"k2-{r}", sim_port)
                rows.append(run("k2proxy, SIGTERM (drain_delay 5s)", p, listen, signal.SIGTERM, admin))
                print(rows[-1], flush=True)
                work = tmp / f"nginx-{r}"
                work.mkdir()
                p, port = nginx(work, sim_port)
                rows.append(run("nginx, SIGQUIT (graceful)", p, port, signal.SIGQUIT))
                print(rows[-1], flush=True)
        finally:
            sim.kill()
            sim.wait()
    out = REPO / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (out / f"drain-{stamp}.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
