"""The store's background thread: what no call of the program would do in time.

Box in the data flow: beside ``Store``. Two things happen without a call to wait for:

- a peer dies: its hold and header tables and every cached mapping of its segments are
  dropped within ``DEATH_CHECK_S``, so a reader does not keep a dead owner's memory (a tensor
  still viewing it keeps only its own window);
- an object that holds something (refs nested in it, a shared storage it aliases) loses its
  last ref here: whether others still hold it is only known by scanning their hold tables,
  so the owner re-runs its reclaim every ``RECLAIM_S`` until no such object is left, even when
  the program never puts again (an idle actor whose result held a caller's ref).

Started on first need; holds no descriptor of its own.
"""

from __future__ import annotations

import logging
import select
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchactors.store.core import Store

logger = logging.getLogger(__name__)

RECLAIM_S = 0.05        # how often objects that hold resources are re-checked while some wait
DEATH_CHECK_S = 0.25    # how often live peers are checked while there are any


class Watcher:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.event = threading.Event()
        self.reclaim_due = False
        self.closed = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def start(self) -> None:
        if self._thread is None and not self.closed:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="torchactors-store-watcher", daemon=True)
                    self._thread.start()

    def nudge(self) -> None:
        """Something to reclaim may have lost its last local ref (safe from ``__del__``)."""
        self.reclaim_due = True
        self.event.set()

    def close(self) -> None:
        self.closed = True
        self.event.set()

    def _run(self) -> None:
        while not self.closed:
            timeout = RECLAIM_S if self.reclaim_due else (DEATH_CHECK_S if self._live_pidfds() else None)
            self.event.wait(timeout)
            self.event.clear()
            if self.closed:
                return
            try:
                self._check_deaths()
                if self.reclaim_due:
                    self.reclaim_due = self.store.background_reclaim()
            except Exception:       # never let the thread die: the next round tries again
                logger.exception("store watcher round failed")

    def _live_pidfds(self) -> list[int]:
        return [p.pidfd for p in list(self.store.membership.peers.values()) if p.pidfd >= 0 and not p.dead]

    def _check_deaths(self) -> None:
        fds = self._live_pidfds()
        dead: list[int] = []
        if fds:
            try:
                dead, _, _ = select.select(fds, [], [], 0)
            except (OSError, ValueError):   # a pidfd closed meanwhile: look again next round
                return
        # a peer can also be dead and already replaced at its index by a new process
        if dead or self.store.membership.replaced_peers():
            self.store.drop_dead_peers()
