"""The process's one current ``Store`` (a leaf: it imports nothing of the store but for types).

Every module of the store that needs "the store of this process" without being handed one
reads it here: unpickling a ref (``refs``), opening a message (``serialize``), a CUDA tensor
inside a structure (``cuda``). Only ``core.attach`` and ``core.current`` install one, so the
start-up order is in one place (see docs/design.md, "One current store, installed in one place"):

- ``core.attach(job_dir, index)`` joins a job: the runtime calls it in the driver and in each
  actor before anything is unpickled.
- ``core.current()`` (what ``store.put``/``get`` use) starts a standalone store, a job of its
  own, when nothing was attached: a program that only puts and gets needs no ``ta.init()``.
- Reading never starts one. A ref unpickled where no store is active stays uncounted (it
  cannot be of a job that a store started now would make), and ``get`` refuses it as a ref of
  another job; a message holding tensors cannot be opened at all (``required`` says what to call).

A forked child starts with no current store: the parent's tables and mappings are not its own.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchactors.store.core import Store

_store: Store | None = None
forks = 0           # forks this process came through: a store made before the last one is a parent's


def active() -> Store | None:
    """The current store, or None when none was started (or it was closed)."""
    s = _store
    return s if s is not None and not s.closed else None


def install(store: Store | None) -> Store | None:
    """Make ``store`` the current one (``core.attach``/``core.current`` only; None clears it)."""
    global _store
    _store = store
    return store


def required(what: str) -> Store:
    """The current store, for ``what`` (a read, which never starts one): else a RuntimeError
    saying what to call first."""
    s = active()
    if s is None:
        raise RuntimeError(f"{what} needs this process's torchactors store, and none is started: call "
                           f"ta.init() (or torchactors.store.attach(job_dir) in a process of a job) first")
    return s


def _after_fork() -> None:
    global forks
    forks += 1
    install(None)


os.register_at_fork(after_in_child=_after_fork)
