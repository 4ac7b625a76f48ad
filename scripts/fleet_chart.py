#!/usr/bin/env python3
"""Draws a fleet's admission over time from the scenario simulator's CSV:
each instance's limit and the backend's own queue, one panel per CSV, as
one SVG file (no plotting library needed).

usage: fleet_chart.py OUT.svg TITLE LABEL CSV [LABEL CSV ...]

A CSV comes from the simulator (proxy/tests/admission_scenarios.rs):
    SIM_CSV=<dir> ADMISSION_SCENARIOS=<folder with one scenario> \\
        cargo test -p proxy --test admission_scenarios
writes <dir>/<seed>.csv with rows "seconds,backend queue,limit,limit,...".
`make fleet-chart` draws docs/img/fleet-limits.svg: a third instance
starting into a 3x peak (scenario 14) with the controller in force.
"""

import csv
import sys

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
QUEUE_COLOR = "#d62728"
W, PANEL_H, LEFT, TOP, GAP = 900, 260, 60, 40, 70


def read(path):
    rows = []
    with open(path) as f:
        for r in csv.reader(f):
            t, queue, limits = float(r[0]), int(r[1]), [int(x) if x else None for x in r[2:]]
            rows.append((t, queue, limits))
    return rows


def smooth(points, every):
    """The mean of each `every` points (a 10 ms sample is noisy to the eye)."""
    out = []
    for i in range(0, len(points), every):
        chunk = [p for p in points[i:i + every] if p[1] is not None]
        if chunk:
            out.append((sum(p[0] for p in chunk) / len(chunk), sum(p[1] for p in chunk) / len(chunk)))
    return out


def panel(label, rows, y0, ymax, tmax):
    plot_w, plot_h = W - LEFT - 20, PANEL_H - 40
    x = lambda t: LEFT + t / tmax * plot_w
    y = lambda v: y0 + plot_h - min(v, ymax) / ymax * plot_h
    svg = [f'<text x="{LEFT}" y="{y0 - 8}" font-size="14" font-weight="bold">{label}</text>',
           f'<rect x="{LEFT}" y="{y0}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for v in range(0, int(ymax) + 1, max(1, int(ymax) // 5)):
        svg.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        svg.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">{v}</text>')
    for s in range(0, int(tmax) + 1, 2):
        svg.append(f'<text x="{x(s):.1f}" y="{y0 + plot_h + 14}" font-size="11" text-anchor="middle">{s}s</text>')
    n = max(len(r[2]) for r in rows)
    series = [("backend queue", QUEUE_COLOR, [(t, q) for t, q, _ in rows])]
    for i in range(n):
        series.append((f"instance {i} limit", COLORS[i % len(COLORS)],
                       [(t, ls[i] if i < len(ls) else None) for t, _, ls in rows]))
    for k, (name, color, pts) in enumerate(series):
        pts = smooth(pts, 10)
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        dash = ' stroke-dasharray="4 3"' if name == "backend queue" else ""
        svg.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"{dash}/>')
        lx = LEFT + 10 + k * 150
        svg.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{y0 + 14}" y2="{y0 + 14}" stroke="{color}" stroke-width="2"{dash}/>')
        svg.append(f'<text x="{lx + 22}" y="{y0 + 18}" font-size="11">{name}</text>')
    return svg


def main(argv):
    if len(argv) < 5 or len(argv) % 2 == 0:
        sys.exit(__doc__)
    out, title, pairs = argv[1], argv[2], list(zip(argv[3::2], argv[4::2]))
    data = [(label, read(path)) for label, path in pairs]
    tmax = max(r[-1][0] for _, r in data)
    ymax = max(max([q for _, q, _ in r] + [l for _, _, ls in r for l in ls if l is not None]) for _, r in data)
    ymax = min(ymax, 60)
    h = TOP + len(data) * (PANEL_H + GAP)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif">',
           f'<rect width="{W}" height="{h}" fill="white"/>',
           f'<text x="{LEFT}" y="22" font-size="16">{title}</text>']
    for k, (label, rows) in enumerate(data):
        svg += panel(label, rows, TOP + 20 + k * (PANEL_H + GAP), ymax, tmax)
    svg.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(svg) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv)
