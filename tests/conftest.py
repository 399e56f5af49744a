"""Shared test setup: one intra-op thread, and fixtures that fail a test that leaks.

A test leaks when, after it (and after ``ta.shutdown()`` if it started the runtime), the test
process holds more open file descriptors than before, ``/dev/shm`` holds new entries of this
process tree, or a child process it started is still alive. Tests that run inside a runtime
started by a module fixture are checked for children and ``/dev/shm`` at the end of the module,
after that runtime is shut down (their actors may legitimately live until then).
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import torch

import torchactors as ta

if not ta.is_initialized():
    # The test process only: an actor process imports this module too when it imports a test
    # module for its class (a runtime is attached by then), and its thread count is its own.
    torch.set_num_threads(1)
# Everything imported so far lives for the whole session: keep it out of the garbage
# collector's scans, so that the gc.collect() calls the leak checks make stay cheap.
gc.collect()
gc.freeze()

FD_TOLERANCE = 2            # fds a test may leave behind (lazily created caches, logging)
CHILD_EXIT_WAIT = 5.0       # seconds a child may take to exit after shutdown
FD_SETTLE_WAIT = 2.0        # seconds for fds to settle (a process reaped, a socket closed)


# -- probes (also used by the tests) ------------------------------------------------------------

def open_fds(pid: int | str = "self") -> int:
    """Number of open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_links(pid: int | str = "self") -> list[str]:
    """What each open fd of ``pid`` points to (fds that close while we look are skipped)."""
    out = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return out


def counted_fds() -> int:
    """Open fds of this process, except the memfds of its own store. The store's pool keeps
    freed segments for reuse (a cache, checked through ``stats()`` by the store tests), and
    closing a store leaves its hold/header tables open (a runtime bug that
    test_store_leaks.py checks on its own, so that it does not fail every test here)."""
    pid = os.getpid()
    own = (f"memfd:torchactors-table-{pid} ", f"memfd:torchactors-{pid}-")
    return sum(1 for link in fd_links() if not any(o in link for o in own))


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def live_children() -> dict[int, psutil.Process]:
    """Descendants of this process that are running (zombies do not count)."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    return out


def process_alive(pid: int) -> bool:
    """Is ``pid`` running (a zombie waiting to be reaped is not)?"""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def shm_entry_of(name: str, pids: set[int]) -> bool:
    """A /dev/shm entry made by torchactors or by torch in one of ``pids`` (other programs on the
    machine may create and remove their own entries while we run)."""
    return "torchactors" in name or any(f"_{pid}_" in name or name.endswith(f"_{pid}") for pid in pids)


class StoreProcess:
    """The base of the store tests' actor classes: another process of the job that keeps refs
    when told to and reports on itself."""

    def __init__(self) -> None:
        self.held: list = []

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict:
        return ta.store.stats()

    def put_and_keep(self, n: int) -> dict:
        ref = ta.store.put(torch.arange(n, dtype=torch.float32))
        self.held.append(ref)
        return {"ref": ref}


def fork_store_process(job_dir: str, work: Callable[[Any], Any], capacity: int | None = None) -> tuple[int, Any]:
    """Fork a process that joins the job's store, sends back ``work(store)`` (pickled: refs
    are counted in flight) and waits to be killed. Returns its pid and what it sent."""
    from torchactors.store import core

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:            # the child: never returns
        try:
            os.close(r)
            blob = pickle.dumps(work(core.attach(job_dir, capacity=capacity)))
            os.write(w, len(blob).to_bytes(4, "little") + blob)
            signal.pause()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        n = int.from_bytes(f.read(4), "little")
        return pid, pickle.loads(f.read(n))


def _new_children_alive(before: set[int]) -> list[psutil.Process]:
    return [p for pid, p in live_children().items() if pid not in before]


def _check_children(before: set[int], where: str) -> None:
    wait_for(lambda: not _new_children_alive(before), CHILD_EXIT_WAIT)
    left = _new_children_alive(before)
    if left:
        desc = ", ".join(f"{p.pid} ({' '.join(p.cmdline())[:80]})" for p in left)
        for p in left:          # do not let one leak cascade into every later test
            try:
                p.kill()
            except psutil.Error:
                pass
        pytest.fail(f"{where}: child processes still alive after ta.shutdown(): {desc}")


def _check_shm(before: set[str], pids: set[int], where: str) -> None:
    new = {n for n in shm_entries() - before if shm_entry_of(n, pids)}
    if new:
        pytest.fail(f"{where}: new /dev/shm entries left behind: {sorted(new)}")


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _module_runtime_shutdown_and_leak_check():
    """Shut down a runtime a module fixture started, then check the module left no child
    process and no /dev/shm entry behind."""
    kids0 = set(live_children())
    shm0 = shm_entries()
    yield
    pids = {os.getpid()} | set(live_children())
    if ta.is_initialized():
        ta.shutdown()
    gc.collect()
    _check_children(kids0, "module teardown")
    _check_shm(shm0, pids, "module teardown")


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail the test if it leaked fds, /dev/shm entries or (if it started the runtime) children."""
    runtime_before = ta.is_initialized()
    kids0 = set(live_children())
    fds0 = counted_fds()
    shm0 = shm_entries()
    yield
    pids = {os.getpid()} | set(live_children())
    if not runtime_before:
        if ta.is_initialized():
            ta.shutdown()
    gc.collect()
    where = request.node.nodeid
    if not runtime_before:
        _check_children(kids0, where)
        wait_for(lambda: counted_fds() <= fds0 + FD_TOLERANCE, FD_SETTLE_WAIT)
        fds1 = counted_fds()
        if fds1 > fds0 + FD_TOLERANCE:
            pytest.fail(f"{where}: leaked {fds1 - fds0} file descriptors (before {fds0}, after {fds1}); "
                        f"open now: {sorted(fd_links())}")
    _check_shm(shm0, pids, where)
