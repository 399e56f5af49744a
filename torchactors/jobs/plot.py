"""``torchactors plot DIR``: a finished (or running) job's ``metrics.csv`` drawn as ``curves.png``.

Box: reads only the run's output directory; matplotlib is optional and imported here alone.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class PlotError(Exception):
    """Nothing to plot, or nothing to plot with: the message says what to do."""


def read_metrics(path: Path) -> tuple[list[float], list[float], list[float], list[float]]:
    """(time, fps) of every row and (time, mean return) of the rows that have one; a torn last
    row of a run still going is skipped."""
    t, fps, t_ret, ret = [], [], [], []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                time_s = float(row["time_s"])
                fps.append(float(row["fps"]))
            except (KeyError, TypeError, ValueError):
                continue
            t.append(time_s)
            if row.get("mean_return") not in (None, "", "nan"):
                t_ret.append(time_s)
                ret.append(float(row["mean_return"]))
    return t, fps, t_ret, ret


def plot_run(run_dir: Path) -> tuple[Path, int]:
    """Draw mean return and frames/s over time into ``run_dir/curves.png``; (the file, rows drawn)."""
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        raise PlotError(f"no {metrics} (give the output directory of a run)")
    try:
        import matplotlib
    except ImportError:
        raise PlotError("needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    t, fps, t_ret, ret = read_metrics(metrics)
    fig, (ax_ret, ax_fps) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    ax_ret.plot(t_ret, ret)
    ax_ret.set_ylabel("mean return")
    ax_ret.grid(alpha=0.3)
    ax_fps.plot(t, fps)
    ax_fps.set_ylabel("frames / s")
    ax_fps.set_xlabel("time (s)")
    ax_fps.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, len(t)
