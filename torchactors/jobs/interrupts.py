"""Ctrl-C during a job: cooperative first, then ``KeyboardInterrupt``, then an emergency exit.

Box: installed by the runner as the SIGINT handler. Before the program runs, Ctrl-C stops at
once; while it runs, the first one only makes ``job.should_stop()`` true; if the program has not
returned ``grace_s`` later (or on a second Ctrl-C) the main thread gets ``KeyboardInterrupt``; if
even that does not bring it back (stuck in C code), ``emergency`` writes the summary, shuts down
and exits 130. During cleanup, Ctrl-C waits for the cleanup unless pressed three times.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from torchactors.jobs.context import JobContext

logger = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130


class Interrupts:
    """SIGINT policy: before the program, stop at once; during it, ask first; during cleanup, finish."""

    def __init__(self, ctx: JobContext, grace_s: float, stream: TextIO) -> None:
        self.ctx = ctx
        self.grace_s = grace_s
        self.stream = stream
        self.phase = "starting"  # starting -> program -> cleanup
        self.count = 0
        self.first_at: float | None = None
        self.forced_at: float | None = None
        self.old_handler: Any = None
        self.installed = False
        self.emergency: Callable[[], None] = lambda: None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.old_handler = signal.signal(signal.SIGINT, self._handle)
            self.installed = True

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.old_handler)
            self.installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.phase == "starting":
            self.ctx._interrupt()
            raise KeyboardInterrupt
        if self.phase == "cleanup":
            if self.count >= 3 or self.forced_at is not None:
                os._exit(EXIT_INTERRUPTED)  # the user insists; actors die with us (PDEATHSIG)
            self._say("still shutting down; press Ctrl-C again to exit at once")
            return
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.ctx._interrupt()
            self._say(f"stopping: the program has {self.grace_s:.0f}s to return (Ctrl-C again to stop now)")
            return
        raise KeyboardInterrupt

    def check_overdue(self) -> None:
        """Called by the ticker thread: enforce the grace period on a program that does not return."""
        if self.phase != "program" or self.first_at is None or not self.installed:
            return
        now = time.monotonic()
        if self.forced_at is None and now - self.first_at >= self.grace_s:
            self.forced_at = now
            self._say(f"the program did not return within {self.grace_s:.0f}s; stopping it")
            main = threading.main_thread().ident
            if main is not None:    # always, once started
                signal.pthread_kill(main, signal.SIGINT)  # wakes a blocked syscall too
        elif self.forced_at is not None and now - self.forced_at >= self.grace_s:
            self._say("the program is stuck and does not take KeyboardInterrupt; exiting")
            self.emergency()

    def _say(self, text: str) -> None:
        try:
            self.stream.write(f"\n{text}\n")
            self.stream.flush()
        except Exception:
            pass
