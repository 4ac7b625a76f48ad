#!/usr/bin/env python3
"""Seed-by-seed A/B of the admission simulator (docs/admission.md, "How to measure").

The scenario test checks each bound on the median of nine seeds: right for CI,
too coarse to tell two builds apart on a noisy scenario. This runs every
scenario of a folder once per seed (SIM_SEEDS=1, SIM_SEED=n), keeps each
measurement per seed, and compares two such runs seed against seed: the
means, the medians, and in how many seeds the second build is better or worse.

    # the current tree's build, seeds 0-29 of the open problems
    python3 scripts/sim_seeds.py run --dir proxy/tests/data/admission-open \\
        --seeds 0-29 --out results/sim-new.json
    # another build: its scenario test binary (cargo test --no-run in a worktree)
    python3 scripts/sim_seeds.py run --bin /tmp/old-target/release/deps/admission_scenarios-<hash> \\
        --dir proxy/tests/data/admission-open --seeds 0-29 --out results/sim-old.json
    python3 scripts/sim_seeds.py compare results/sim-old.json results/sim-new.json
    # a scenario's rare bad runs: seeds past a bound, per run (one column each)
    python3 scripts/sim_seeds.py tails --match '62_.*purchase_p99_ms' --over 1000 \\
        results/sim-old.json results/sim-new.json

Seeds run two at a time (--jobs). Latency keys (`_ms`) count as better when
5% lower; fractions (success, goodput) when 0.005 higher.
"""

import argparse
import concurrent.futures
import json
import os
import re
import signal
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_KEYS = (
    "purchase_success,purchase_p50_ms,purchase_p99_ms,goodput,"
    "merchant_success,admin_success,customer_service_success"
)
# `NN_name: description` opens a scenario's block.
SCENARIO = re.compile(r"^(\d\S*): ")
# `  <phase, may hold spaces> <key> <value> ...`
MEASURE = re.compile(r"^  (\S.*?)\s+([a-z][a-z0-9_]*)\s+(-?\d+(?:\.\d+)?)(?:\s|$)")


def parse_seeds(text):
    """`0-29` or `0,3,7` into a list of ints."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            if hi < lo:
                raise ValueError
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected a range such as 0-29 or a list such as 0,3,7")


def parse_output(stdout):
    """The scenario test's printout as {"scenario/phase/key": value}."""
    found, scenario = {}, None
    for line in stdout.splitlines():
        m = SCENARIO.match(line)
        if m:
            scenario = m.group(1)
            continue
        m = MEASURE.match(line)
        if m and scenario:
            found[f"{scenario}/{m.group(1).strip()}/{m.group(2)}"] = float(m.group(3))
    return found


def build_current():
    """Builds the scenario test of this tree (release) and returns its binary."""
    cmd = ["cargo", "test", "--release", "-p", "proxy", "--test", "admission_scenarios",
           "--no-run", "--message-format=json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"sim_seeds: building the scenario test failed:\n{out.stderr[-3000:]}")
    for line in out.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
                and msg["target"]["name"] == "admission_scenarios":
            return msg["executable"]
    sys.exit("sim_seeds: cargo built no admission_scenarios binary")


def run_seed(binary, folder, keys, seed):
    env = dict(os.environ, SIM_SEED=str(seed), SIM_SEEDS="1",
               ADMISSION_SCENARIOS=folder, SIM_PRINT=keys)
    proc = subprocess.run([binary, "--nocapture", "--test-threads=1", "admission_scenarios_meet"],
                          env=env, cwd=os.path.join(ROOT, "proxy"), capture_output=True, text=True)
    found = parse_output(proc.stdout)
    if not found:
        sys.exit(f"sim_seeds: seed {seed} printed no measurement (exit {proc.returncode}):\n"
                 f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seed, found


def run(args):
    folder = os.path.abspath(args.dir)
    if not os.path.isdir(folder):
        sys.exit(f"sim_seeds: --dir {args.dir}: not a folder of scenario files")
    binary = os.path.abspath(args.bin) if args.bin else build_current()
    if not os.access(binary, os.X_OK):
        sys.exit(f"sim_seeds: --bin {binary}: not an executable")
    per_key = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(run_seed, binary, folder, args.keys, s) for s in args.seeds]
        for done, job in enumerate(concurrent.futures.as_completed(jobs), 1):
            seed, found = job.result()
            for key, value in found.items():
                per_key.setdefault(key, {})[str(seed)] = value
            print(f"\rseed {done}/{len(jobs)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump({"binary": binary, "dir": folder, "seeds": args.seeds, "values": per_key}, f, indent=1)
    print(f"{len(per_key)} measurements x {len(args.seeds)} seeds -> {args.out}")


def better_worse(key, a, b):
    if key.endswith("_ms"):
        return b < a * 0.95, b > a * 1.05
    return b > a + 0.005, b < a - 0.005


def load_runs(paths):
    """Each run's measurements (key -> seed -> value), in the order given."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                runs.append(json.load(f)["values"])
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"sim_seeds: {path}: not a sim_seeds run ({e})")
    return runs


def compare(args):
    a, b = load_runs((args.a, args.b))
    rows = 0
    print(f"{'measurement':<66} {'mean A':>9} {'mean B':>9} {'med A':>9} {'med B':>9}  better worse  seeds")
    for key in sorted(set(a) & set(b)):
        if args.match and not re.search(args.match, key):
            continue
        seeds = sorted(set(a[key]) & set(b[key]), key=int)
        if not seeds:
            continue
        va, vb = [a[key][s] for s in seeds], [b[key][s] for s in seeds]
        flags = [better_worse(key, x, y) for x, y in zip(va, vb)]
        print(f"{key:<66} {statistics.mean(va):9.3f} {statistics.mean(vb):9.3f} "
              f"{statistics.median(va):9.3f} {statistics.median(vb):9.3f}  "
              f"{sum(f[0] for f in flags):6} {sum(f[1] for f in flags):5}  {len(seeds):5}")
        rows += 1
    if rows == 0:
        sys.exit("sim_seeds: the two runs share no measurement")


def past(values, over=None, under=None):
    """The seeds (sorted) whose value is over `over` or under `under`."""
    return sorted((s for s, v in values.items()
                   if (over is not None and v > over) or (under is not None and v < under)), key=int)


def tails(args):
    if (args.over is None) == (args.under is None):
        sys.exit("sim_seeds: tails: give one bound, --over X or --under X")
    runs = load_runs(args.runs)
    keys = sorted(k for k in set().union(*runs) if re.search(args.match, k))
    if not keys:
        sys.exit(f"sim_seeds: tails: no measurement matches {args.match!r}")
    bound = f"over {args.over}" if args.over is not None else f"under {args.under}"
    names = [os.path.basename(p) for p in args.runs]
    print(f"seeds {bound}, of those run")
    print(f"{'measurement':<66} " + " ".join(f"{n[:24]:>24}" for n in names))
    for key in keys:
        cells = []
        for run in runs:
            values = run.get(key, {})
            cells.append(f"{len(past(values, args.over, args.under))}/{len(values)}" if values else "-")
        print(f"{key:<66} " + " ".join(f"{c:>24}" for c in cells))


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends quietly
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every scenario of a folder once per seed")
    r.add_argument("--dir", default=os.path.join(ROOT, "proxy/tests/data/admission-open"))
    r.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-29"))
    r.add_argument("--bin", help="a built admission_scenarios test binary (default: build this tree)")
    r.add_argument("--keys", default=DEFAULT_KEYS, help="SIM_PRINT keys, comma-separated")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare", help="compare two runs seed against seed (B against A)")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--match", help="only measurements whose name matches this regex")
    t = sub.add_parser("tails", help="count the seeds past a bound, per run: a scenario's rare bad runs")
    t.add_argument("runs", nargs="+")
    t.add_argument("--match", required=True, help="measurements whose name matches this regex")
    t.add_argument("--over", type=float, help="count values over this")
    t.add_argument("--under", type=float, help="count values under this")
    args = p.parse_args()
    {"run": run, "compare": compare, "tails": tails}[args.cmd](args)


if __name__ == "__main__":
    main()
