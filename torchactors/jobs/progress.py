"""The progress ticker: once a second, one ``metrics.csv`` row and one progress line from the latest report.

Box: a thread of the runner while the program runs. It also drives the Ctrl-C watchdog
(``interrupts.Interrupts.check_overdue``), since it is the one thread that wakes every second.
"""

from __future__ import annotations

import csv
import logging
import threading
from collections.abc import Callable
from typing import TextIO

from torchactors.jobs.context import JobContext

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0
METRICS_COLUMNS = ("time_s", "frames", "fps", "episodes", "mean_return", "updates")


class Ticker(threading.Thread):
    """Once a second: a metrics.csv row, a progress line, and the Ctrl-C watchdog."""

    def __init__(self, ctx: JobContext, metrics_file: TextIO, stream: TextIO, on_overdue: Callable[[], None]) -> None:
        super().__init__(name="torchactors-progress", daemon=True)
        self.ctx = ctx
        self.writer = csv.writer(metrics_file)
        self.metrics_file = metrics_file
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.on_overdue = on_overdue
        self.stopping = threading.Event()
        self.last_t, self.last_frames = 0.0, 0
        self.line_open = False
        self.writer.writerow(METRICS_COLUMNS)
        metrics_file.flush()

    def run(self) -> None:
        while not self.stopping.wait(PROGRESS_INTERVAL_S):
            try:
                self.tick()
                self.on_overdue()
            except Exception:  # progress must never take the job down
                logger.exception("progress tick failed")

    def tick(self) -> None:
        """Append one row and print one progress line from the latest report."""
        t = self.ctx.elapsed
        m = self.ctx._snapshot()
        dt = t - self.last_t
        fps = (m["frames"] - self.last_frames) / dt if dt > 0 else 0.0
        self.last_t, self.last_frames = t, m["frames"]
        ret = m["mean_return"]
        self.writer.writerow([f"{t:.3f}", m["frames"], f"{fps:.1f}", m["episodes"],
                              "" if ret is None else f"{ret:.4f}", m["updates"]])
        self.metrics_file.flush()
        line = (f"{t:7.1f}s  frames {m['frames']:>11,}  fps {fps:>9,.0f}  episodes {m['episodes']:>8,}"
                f"  return {'-' if ret is None else f'{ret:.2f}':>8}  updates {m['updates']:>7,}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.line_open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, join: bool = True) -> None:
        """Stop ticking, write the last row (a short run still gets one) and end the progress line."""
        self.stopping.set()
        if join and self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)
        try:
            self.tick()
        except Exception:
            logger.exception("final progress tick failed")
        if self.line_open:
            self.stream.write("\n")
            self.stream.flush()
