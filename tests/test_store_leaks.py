"""No leaks: long put/get/free loops across two processes come back to where they started
(fds, mapped segments, objects, bytes, /dev/shm), closing a store closes its memfds, and a
SIGKILL of any process (actor or driver) leaves no process and no shared memory behind.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import StoreProcess, fd_links, open_fds, process_alive, shm_entries, shm_entry_of, wait_for

import torchactors as ta
from torchactors import store
from torchactors.store import core

REPO = Path(__file__).resolve().parents[1]
CYCLES = 10_000
BATCH = 100


@ta.actor(num_threads=1)
class Churner(StoreProcess):
    def get_all(self, refs: list, first: int) -> bool:
        """Get every ref (a view each) and check its first element; keep nothing."""
        return all(store.get(r)[0].item() == first + i for i, r in enumerate(refs))

    def put_batch(self, n: int, first: int) -> list:
        """Put ``n`` objects and return their refs; this process keeps none."""
        return [store.put(torch.full((64,), float(first + i))) for i in range(n)]

    def hold(self, box: dict) -> None:
        self.held.append(box["ref"])
        store.get(box["ref"])           # map the owner's segment here too


def memfd_holders(pids: set[int]) -> list[tuple[int, str]]:
    """Every (process, fd link) on the machine that still holds a memfd made by one of ``pids``
    (data segments are named memfd:torchactors-<pid>-<n>, ref tables memfd:torchactors-table-<pid>)."""
    names = tuple(f"memfd:torchactors-{p}-" for p in pids) + tuple(f"memfd:torchactors-table-{p} " for p in pids)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for link in fd_links(int(entry)):
            if any(n in link for n in names):
                found.append((int(entry), link))
    return found


def snapshot(actor, actor_pid: int) -> dict:
    gc.collect()
    mine, theirs = store.stats(), ta.get(actor.stats.remote())
    return {"driver_fds": open_fds(), "actor_fds": open_fds(actor_pid), "shm": shm_entries(),
            "driver": mine, "actor": theirs}


def assert_back_to(base: dict, now: dict, pids: set[int]) -> None:
    assert now["driver_fds"] <= base["driver_fds"] + 2, (base["driver_fds"], now["driver_fds"])
    assert now["actor_fds"] <= base["actor_fds"] + 2, (base["actor_fds"], now["actor_fds"])
    assert not {n for n in now["shm"] - base["shm"] if shm_entry_of(n, pids)}, now["shm"] - base["shm"]
    for side in ("driver", "actor"):
        b, n = base[side], now[side]
        assert n["objects"] == b["objects"], (side, b, n)
        assert n["bytes_used"] == b["bytes_used"], (side, b, n)
        assert n["mapped_segments"] <= b["mapped_segments"] + 1, (side, b, n)
        assert n["segments"] <= b["segments"] + 1, (side, b, n)


@pytest.fixture(scope="module")
def churner():
    ta.init(num_threads=1)
    h = Churner.remote()
    pid = ta.get(h.pid.remote())
    yield h, pid
    ta.kill(h)


# -- long loops come back to where they started ---------------------------------------------------

def test_closed_stores_close_their_memfds():
    """Creating and closing stores (what ta.init / ta.shutdown do) must not leave fds open."""
    s = core.Store()
    s.close()
    del s
    gc.collect()
    fds0 = open_fds()
    for _ in range(5):
        s = core.Store()
        s.close()
        del s
        gc.collect()
    assert open_fds() <= fds0 + 1, [l for l in fd_links() if "torchactors-table" in l]


def test_put_get_free_cycles_in_one_process_come_back_to_the_start():
    def state():
        gc.collect()
        st = store.stats()
        return open_fds(), st["objects"], st["bytes_used"], st["segments"]

    for i in range(BATCH):                          # warm up: pools and caches
        store.free(store.put(torch.full((64,), float(i))))
    fds0, objects0, used0, segments0 = state()
    for i in range(CYCLES):
        ref = store.put(torch.full((64,), float(i)))
        assert store.get(ref)[0].item() == float(i)
        store.free(ref)
    fds1, objects1, used1, segments1 = state()
    assert fds1 <= fds0 + 1
    assert (objects1, used1) == (objects0, used0)
    assert segments1 <= segments0 + 1


def test_10k_cycles_driver_puts_actor_gets_driver_frees_leave_nothing_behind(churner):
    actor, pid = churner

    def cycle(first: int) -> None:
        refs = [store.put(torch.full((64,), float(first + i))) for i in range(BATCH)]
        assert ta.get(actor.get_all.remote(refs, first))
        store.free(refs)

    for k in range(2):
        cycle(k * BATCH)
    base = snapshot(actor, pid)
    for k in range(CYCLES // BATCH):
        cycle(k * BATCH)
    assert_back_to(base, snapshot(actor, pid), {os.getpid(), pid})


def test_10k_cycles_actor_puts_driver_gets_and_frees_leave_nothing_behind(churner):
    actor, pid = churner

    def cycle(first: int) -> None:
        refs = ta.get(actor.put_batch.remote(BATCH, first))
        values = store.get(refs)
        assert [v[0].item() for v in values] == [float(first + i) for i in range(BATCH)]
        del values
        store.free(refs)

    for k in range(2):
        cycle(k * BATCH)
    base = snapshot(actor, pid)
    for k in range(CYCLES // BATCH):
        cycle(k * BATCH)
    assert_back_to(base, snapshot(actor, pid), {os.getpid(), pid})


def test_10k_cycles_actor_puts_driver_gets_and_drops_leave_nothing_behind(churner):
    """No free at all: dropping the last Python reference is enough."""
    actor, pid = churner

    def cycle(first: int) -> None:
        refs = ta.get(actor.put_batch.remote(BATCH, first))
        assert store.get(refs[-1])[0].item() == float(first + BATCH - 1)

    for k in range(2):
        cycle(k * BATCH)
    base = snapshot(actor, pid)
    for k in range(CYCLES // BATCH):
        cycle(k * BATCH)
    now = snapshot(actor, pid)
    # the actor reclaims on its next pass (stats() makes one)
    assert wait_for(lambda: ta.get(actor.stats.remote())["objects"] == base["actor"]["objects"], 5.0)
    assert_back_to(base, snapshot(actor, pid), {os.getpid(), pid})
    del now


# -- SIGKILL of an actor -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_actor(churner):
    """An actor that owned objects (one of them mapped here) and borrowed one of ours, then was
    SIGKILLed. Tests take what they need out of the returned dict, so that no frame keeps it."""
    victim = Churner.remote()
    pid = ta.get(victim.pid.remote())
    mapped = ta.get(victim.put_and_keep.remote(10))
    unmapped = ta.get(victim.put_and_keep.remote(20))
    view = store.get(mapped["ref"])
    assert view[9].item() == 9.0
    mine = store.put(torch.ones(1000))
    ta.get(victim.hold.remote({"ref": mine}))           # the actor maps our segment too
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ta.ActorDiedError):
        ta.get(victim.pid.remote(), timeout=30)
    state = {"pid": pid, "mapped": mapped["ref"], "unmapped": unmapped["ref"], "view": view, "mine": mine}
    del mapped, unmapped, view, mine
    yield state


def test_get_after_the_owner_was_sigkilled_raises_owner_died_or_returns_data_never_crashes(killed_actor):
    pid = killed_actor["pid"]
    assert wait_for(lambda: not process_alive(pid), 5.0)
    for name, n in (("mapped", 10), ("unmapped", 20)):
        ref = killed_actor[name]
        try:
            value = store.get(ref, timeout=10)
        except ta.OwnerDiedError as e:
            assert e.object_id == ref.id and str(pid) in str(e)
        else:
            assert torch.equal(value, torch.arange(n, dtype=torch.float32))
    with pytest.raises(ta.OwnerDiedError):
        store.get(killed_actor["unmapped"])           # never mapped here: the data died with its owner
    view = killed_actor.pop("view")                   # a view taken before the death stays readable
    assert torch.equal(view, torch.arange(10, dtype=torch.float32))


def test_sigkilled_actor_process_is_gone_and_its_refs_to_our_objects_are_released(killed_actor):
    assert wait_for(lambda: not process_alive(killed_actor["pid"]), 5.0)
    before = store.stats()["objects"]
    del killed_actor["mine"]                          # the dead actor's hold must not count
    gc.collect()
    assert wait_for(lambda: store.stats()["objects"] == before - 1, 5.0)


def test_sigkilled_actor_leaves_no_memfd_of_it_in_any_process(killed_actor):
    pid = killed_actor["pid"]
    for name in ("mapped", "unmapped"):               # gets that notice the owner died
        try:
            store.get(killed_actor[name])
        except ta.OwnerDiedError:
            pass
    killed_actor.clear()                              # drop every view and ref
    gc.collect()
    store.stats()
    wait_for(lambda: not memfd_holders({pid}), 3.0)
    left = memfd_holders({pid})
    assert not left, "\n".join(f"pid {p} holds {link}" for p, link in left)


# -- SIGKILL of the driver -----------------------------------------------------------------------

DRIVER = textwrap.dedent('''
    import json, os, sys, time
    import torch
    import torchactors as ta
    from torchactors import store

    @ta.actor(num_threads=1)
    class Worker:
        def __init__(self):
            self.held = []
        def pid(self):
            return os.getpid()
        def hold(self, box):
            self.held.append(box["ref"])
            return float(store.get(box["ref"]).sum())
        def put_and_keep(self, n):
            ref = store.put(torch.ones(n))
            self.held.append(ref)
            return {"ref": ref}

    ta.init(num_threads=1)
    workers = [Worker.remote()]
    pids = ta.get([w.pid.remote() for w in workers])
    ref = store.put(torch.ones(1000))
    boxes = []
    for w in workers:
        assert ta.get(w.hold.remote({"ref": ref})) == 1000.0
        boxes.append(ta.get(w.put_and_keep.remote(1000)))
    views = [store.get(b["ref"]) for b in boxes]
    print(json.dumps({"driver": os.getpid(), "actors": pids}), flush=True)
    time.sleep(600)
''')


def test_sigkill_of_the_driver_leaves_no_actor_process_and_no_shared_memory(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    shm0 = shm_entries()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert line, "the driver script exited before starting its actors"
        info = json.loads(line)
        pids = {info["driver"], *info["actors"]}
        assert all(process_alive(p) for p in info["actors"])
        assert memfd_holders(pids)                  # sanity: the probe sees the job's memfds
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert wait_for(lambda: not any(process_alive(p) for p in info["actors"]), 10.0), \
        [p for p in info["actors"] if process_alive(p)]
    assert wait_for(lambda: not memfd_holders(pids), 5.0), memfd_holders(pids)
    new_shm = {n for n in shm_entries() - shm0 if shm_entry_of(n, pids)}
    assert not new_shm, new_shm
