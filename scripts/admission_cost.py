#!/usr/bin/env python3
"""Instructions per request that admission costs: one k2proxy binary under
callgrind with its tree's default policy (`mode = "adaptive"`), then with
`mode = "off"`, wrk's default request against a legacy-sim with no service
time, as `make bench-peers PHASES=instructions` measures (marginal: less
what the process runs idle). Nothing waits in the queue at wrk's 8
connections, so this is the cost every admitted request pays.

usage: admission_cost.py [--tree DIR] [--binary PATH] [--rounds N]

`--tree` is a checkout of any commit (a `git worktree`), whose own
`scripts/bench_peers.py`, `routes.toml` and default policy are used, so an
older build gets the configuration it understands; `--binary` is that
tree's k2proxy (built with `cargo build --release --bin k2proxy`). Both
default to this tree. The legacy-sim is always this tree's. The figure is
the lowest of the rounds of each, on minus off.
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def load_bench(tree):
    spec = importlib.util.spec_from_file_location(
        "tree_bench_peers", os.path.join(tree, "scripts", "bench_peers.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # This tree's legacy-sim, whatever the tree measured.
    bench.BIN = os.path.join(REPO, "target", "release")
    return bench


def no_rate_limits(policy):
    return re.sub(r"(?ms)^\[\[rate_limit\]\].*?(?=^\[|\Z)", "", policy)


def admission_off(policy):
    off = no_rate_limits(policy).replace('mode = "adaptive"', 'mode = "off"')
    if off == no_rate_limits(policy):
        sys.exit('admission_cost: the policy has no mode = "adaptive" to turn off')
    return off


def measure(bench, binary, sim_port, edit, label):
    out_file = os.path.join(bench.WORK, f"cg-{label}.%p.out")
    wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"]
    p, port = bench.k2proxy([sim_port], policy_edit=edit, wrap=wrap, binary=binary)
    url = f"http://127.0.0.1:{port}/checkout/x"
    subprocess.run(["wrk", "-t1", "-c8", "-d2s", url], capture_output=True, check=True)
    subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, check=True)
    t0 = time.monotonic()
    out = subprocess.run(["wrk", "-t1", "-c8", "-d8s", url],
                         capture_output=True, text=True, check=True).stdout
    n = int(re.search(r"(\d+) requests in", out).group(1))
    total = bench.callgrind_dump(p, out_file, 1)
    loaded = time.monotonic() - t0
    t0 = time.monotonic()
    time.sleep(4)
    idle_rate = bench.callgrind_dump(p, out_file, 2) / (time.monotonic() - t0)
    bench.stop(p)
    return (total - idle_rate * loaded) / n, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=REPO, help="checkout whose bench script and config to use")
    ap.add_argument("--binary", help="its k2proxy (default: TREE/target/release/k2proxy)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    binary = args.binary or os.path.join(args.tree, "target", "release", "k2proxy")
    for need in (binary, os.path.join(REPO, "target", "release", "legacy-sim")):
        if not os.access(need, os.X_OK):
            sys.exit(f"admission_cost: {need} is not built")
    bench = load_bench(args.tree)
    _, sim_port = bench.sim(100000, "0ms", "fast")[:2]
    seen = {"on": [], "off": []}
    try:
        for r in range(args.rounds):
            for label, edit in (("on", no_rate_limits), ("off", admission_off)):
                m, n = measure(bench, binary, sim_port, edit, f"{label}-{r}")
                seen[label].append(m)
                print(f"admission {label:<3} {m:9.0f} instructions/request ({n} requests)", flush=True)
    finally:
        bench.stop_all()
    on, off = min(seen["on"]), min(seen["off"])
    print(f"admission costs {on - off:.0f} instructions/request "
          f"(on {on:.0f}, off {off:.0f}; callgrind files in {bench.WORK})")


if __name__ == "__main__":
    main()
