"""Helpers shared by the single-purpose benchmark scripts (bench_drain.py,
bench_fleet_limits.py): loopback ports, and a release k2proxy started as
users run it (the default log level: the access log on, to a file)."""

import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "target" / "release"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def start_k2proxy(work, backend, route, policy, threads=1):
    """k2proxy in `work` with one cluster on `backend`, the `[[routes]]`
    entry `route` (TOML) and the policy text `policy`; returns (process,
    listen port, admin port) once both listen. Its log goes to
    work/k2proxy.log."""
    listen, admin = free_port(), free_port()
    work.mkdir(parents=True, exist_ok=True)
    (work / "routes.toml").write_text(f"""[server]
listen = ["127.0.0.1:{listen}"]
admin = "127.0.0.1:{admin}"
threads = {threads}
policy = "policy.toml"
max_connections_per_client = 100000

[clusters.main]
connect_timeout = "300ms"

[[clusters.main.sites]]
name = "a"
role = "primary"
backends = ["127.0.0.1:{backend}"]

[[routes]]
{route}
cluster = "main"
""")
    (work / "policy.toml").write_text(policy)
    p = subprocess.Popen([str(BIN / "k2proxy"), "run", "--routes", str(work / "routes.toml")],
                         stdout=subprocess.DEVNULL, stderr=open(work / "k2proxy.log", "w"))
    wait_port(listen)
    wait_port(admin)
    return p, listen, admin
