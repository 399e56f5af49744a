"""Plot a bench.py JSON: put_get / xproc_get time vs size (log-log) and torchactors scaling.

    python benchmarks/plot.py RESULTS.json OUT.png

Needs matplotlib (the optional 'bench' extra: pip install 'torchactors[bench]').
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any

log = logging.getLogger("plot")

from report import SYSTEMS  # benchmarks/ is on sys.path: this runs as a script

_SIZE = re.compile(r"^(\w+)\[(\d+)(B|KB|MB|GB)\]$")
_SCALE = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def size_series(system: dict[str, Any], workload: str) -> list[tuple[int, float]]:
    """(bytes, median s) of one sized workload, sorted by size."""
    out = []
    for name, res in system.get("results", {}).items():
        m = _SIZE.match(name)
        if m and m.group(1) == workload and "median" in res:
            out.append((int(m.group(2)) * _SCALE[m.group(3)], res["median"]))
    return sorted(out)


def plot(doc: dict[str, Any], out_png: str) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib "
                         "(or pip install 'torchactors[bench]')") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = doc["systems"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for i, label in enumerate(SYSTEMS):
        for workload, style in (("put_get", "-o"), ("xproc_get", "--s")):
            pts = size_series(systems.get(label, {}), workload)
            if pts:
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}",
                          label=f"{label} {workload}")
    ax.set_xlabel("tensor size (bytes)")
    ax.set_ylabel("median seconds per operation")
    ax.set_title("put_get (solid) and xproc_get (dashed) vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

    scaling = systems.get("torchactors", {}).get("scaling") or {}
    for ax, name, ylabel, value in (
            (axes[1], "actor_rtt", "calls per second", lambda r: 1.0 / r["median"]),
            (axes[2], "actor_learner", "rollouts per second", lambda r: r["rate"])):
        series = scaling.get(name, {})
        ns = sorted(series, key=int)
        if ns:
            ax.plot([int(n) for n in ns], [value(series[n]) for n in ns], "-o", label="torchactors")
            ax.set_xticks([int(n) for n in ns])
        else:
            ax.text(0.5, 0.5, "no scaling data\n(run bench.py --scaling)", ha="center",
                    va="center", transform=ax.transAxes)
        ax.set_xlabel("actors")
        ax.set_ylabel(ylabel)
        ax.set_title(f"torchactors {name} scaling")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    log.info("wrote %s", out_png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="JSON written by bench.py --json")
    ap.add_argument("out", help="PNG to write")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[plot] %(message)s", stream=sys.stderr)
    with open(args.results) as f:
        plot(json.load(f), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
