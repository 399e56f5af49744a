"""What a job's program gets: ``JobContext``, its actors, its config, and the report/stop/save hooks.

Box: made by the runner, passed to ``program(job, **program_args)``. The program's side
(``report``, ``should_stop``, ``save_model``, ``elapsed``) may be called from any thread; the
runner's side (underscored) starts and ends the clock, latches the first stop reason and hands
the latest counters to the progress ticker and the summary.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchactors.jobs.config import JobConfig

logger = logging.getLogger(__name__)


class JobContext:
    """What a job's program gets: its actors, its config, and the report/stop/save hooks.

    ``report`` takes cumulative counters and may be called from any thread; the runner keeps
    only the latest values, so calling it often is cheap.
    """

    def __init__(self, config: JobConfig, out_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.config: dict = config.to_dict()
        self.out_dir: Path = out_dir
        self.roles: dict[str, list] = {}
        self.name: str = config.job.name
        self.seed: int = config.job.seed
        self._stop = config.stop
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, Any] = {"frames": 0, "episodes": 0, "mean_return": None, "updates": 0}
        self._extra: dict[str, Any] = {}
        self._started: float | None = None
        self._ended: float | None = None
        self._interrupted = threading.Event()
        self._reason: str | None = None

    # -- the program's side

    def should_stop(self) -> bool:
        """True once Ctrl-C was pressed or a ``stop:`` condition holds; the program should return."""
        return self._check() is not None

    def report(self, frames: int | None = None, episodes: int | None = None,
               mean_return: float | None = None, updates: int | None = None, **extra: Any) -> None:
        """Record the job's cumulative progress; a counter left out keeps its last value."""
        with self._lock:
            for key, value in (("frames", frames), ("episodes", episodes), ("updates", updates)):
                if value is not None:
                    self._latest[key] = int(value)
            if mean_return is not None:
                self._latest["mean_return"] = float(mean_return)
            self._extra.update(extra)
        self._check()

    def save_model(self, state_dict: Any, name: str = "policy.pt") -> Path:
        """``torch.save`` to ``out_dir/name`` through a temporary file, so a crash leaves no half file."""
        import torch

        path = self.out_dir / name
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state_dict, tmp)
        os.replace(tmp, path)
        logger.info("saved %s", path)
        return path

    @property
    def elapsed(self) -> float:
        """Seconds since the program started (0 before)."""
        if self._started is None:
            return 0.0
        return (self._ended if self._ended is not None else self._clock()) - self._started

    # -- the runner's side

    def _begin(self) -> None:
        """The program starts now: ``max_seconds`` and the metrics' ``time_s`` count from here."""
        self._started = self._clock()

    def _end(self) -> None:
        """The program is over (returned, raised or abandoned): freeze ``elapsed``."""
        if self._started is not None and self._ended is None:
            self._ended = self._clock()

    def _check(self) -> str | None:
        """The first stop reason that holds, latched: later calls keep the first reason."""
        if self._reason is not None:
            return self._reason
        if self._interrupted.is_set():
            reason = "interrupted"
        else:
            with self._lock:
                frames, ret = self._latest["frames"], self._latest["mean_return"]
            s = self._stop
            if s.target_return is not None and ret is not None and not math.isnan(ret) and ret >= s.target_return:
                reason = "target_return"
            elif s.max_frames is not None and frames >= s.max_frames:
                reason = "max_frames"
            elif s.max_seconds is not None and self._started is not None and self.elapsed >= s.max_seconds:
                reason = "max_seconds"
            else:
                return None
        with self._lock:
            if self._reason is None:
                self._reason = reason
                logger.info("stop: %s", reason)
            return self._reason

    def _interrupt(self) -> None:
        self._interrupted.set()
        with self._lock:
            self._reason = "interrupted"  # Ctrl-C wins over a condition seen at the same time

    def _snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._latest)
