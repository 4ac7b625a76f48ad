"""Writes a copy of the repo's routes.toml pointed at a bench's ports.

usage: bench_routes.py OUT PROXY_PORT ADMIN_PORT SIM_PORT THREADS POLICY_PATH REPO
The primary site gets the sim; the secondary one more port, which the primary
keeps unused.
"""
import re
import sys

out, proxy, admin, sim, threads, policy, repo = sys.argv[1:]
t = open(f"{repo}/routes.toml").read()
t = re.sub(r"(?m)^listen = .*$", f'listen = ["127.0.0.1:{proxy}"]', t)
t = re.sub(r"(?m)^admin = .*$", f'admin = "127.0.0.1:{admin}"', t)
t = re.sub(r"(?m)^threads = .*$", f"threads = {threads}", t)
t = re.sub(r"(?m)^policy = .*$", f'policy = "{policy}"', t)
# The load generator is one address standing for thousands of shoppers: lift
# the per-address connection cap (1 000 by default), which no real peak meets.
t = re.sub(r"(?m)^policy = (.*)$", r"policy = \1\nmax_connections_per_client = 1000000", t, count=1)
sites = iter([f'backends = ["127.0.0.1:{sim}"]', f'backends = ["127.0.0.1:{int(sim) + 1}"]'])
t = re.sub(r"(?m)^backends = .*$", lambda m: next(sites), t)
open(out, "w").write(t)
