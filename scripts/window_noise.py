#!/usr/bin/env python3
"""How much more a limit's windows vary than independent samples would, in
k2proxy access logs.

usage: window_noise.py [--skip SECONDS] LOG [LOG ...]

Each LOG is one instance's log (access log on, the default). The backend
latencies of its proxied requests (`upstream_ms`), in the order they
finished, are cut into windows of 16, as the adaptive limit's are. The
figure printed is the standard deviation of the window means over that of
the samples divided by 4: 1 when consecutive latencies are independent,
which is what the limit's tolerance assumes. A queue that comes and goes,
or a stalled CPU that delays a window's requests together, makes it
larger. The scenario simulator prints the same as `window_noise`
(`SIM_PRINT=window_noise`), so the two can be compared on one backend
shape. `--skip` leaves out each log's first seconds of traffic (a cold
start's climb; 1 by default).
"""

import argparse
import re
import statistics
from datetime import datetime

WINDOW = 16
LINE = re.compile(r'^(\S+)\s.*k2proxy::access.*outcome="proxied".*\supstream_ms=([0-9.]+)')


def latencies(path, skip):
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                t = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
                rows.append((t, float(m.group(2))))
    rows.sort()
    if not rows:
        return []
    start = rows[0][0] + skip
    return [ms for t, ms in rows if t >= start]


def noise(x):
    """(between, within, windows): the variance of the window means and
    that of the samples over 16, each times the number of windows."""
    n = len(x) // WINDOW
    if n < 2:
        return 0.0, 0.0, 0
    x = x[: n * WINDOW]
    means = [statistics.fmean(x[i * WINDOW : (i + 1) * WINDOW]) for i in range(n)]
    return statistics.variance(means) * n, statistics.variance(x) / WINDOW * n, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", type=float, default=1.0, help="seconds left out at the start")
    ap.add_argument("logs", nargs="+")
    args = ap.parse_args()
    tb = tw = tn = 0
    for path in args.logs:
        x = latencies(path, args.skip)
        b, w, n = noise(x)
        if n == 0:
            print(f"{path}: fewer than two windows of proxied requests")
            continue
        print(f"{path}: {len(x)} samples, mean {statistics.fmean(x):.1f} ms, window noise {(b / w) ** 0.5:.2f}")
        tb, tw, tn = tb + b, tw + w, tn + n
    if tn and len(args.logs) > 1:
        print(f"pooled: {tn} windows, window noise {(tb / tw) ** 0.5:.2f}")


if __name__ == "__main__":
    main()
