"""Nothing leaks however processes come and go: figures a user would check.

Descriptors (/proc/self/fd), mapped segments (/proc/self/maps), the machine's Shmem
(/proc/meminfo) and the store's own counts come back to where they were after owners die,
after borrowed refs come back nested in results, after thousands of puts of shared tensors,
and large objects do not cost a descriptor each. Owners that die here are forked from this
process (fast); the actor versions of the same figures are in the slow soaks at the end.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import StoreProcess, fork_store_process, open_fds, wait_for

import torchactors as ta
from torchactors import store
from torchactors.errors import OwnerDiedError, StoreFullError
from torchactors.store import core

MiB = 1 << 20


def mapped_windows(pid: int) -> int:
    """Mappings in this process of memfd segments made by process ``pid``."""
    tag = f"memfd:torchactors-{pid}-"
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if tag in line)


def shmem_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no Shmem line in /proc/meminfo")


def fork_owner(job_dir: str, sizes: list[int]) -> tuple[int, list]:
    """A process of the job (forked) that puts one tensor per size, sends the refs and waits."""
    return fork_store_process(job_dir, lambda st: [st.put(torch.full((n // 4,), float(i)))
                                                   for i, n in enumerate(sizes)])


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


# -- a dead owner's memory leaves its readers ---------------------------------------------------

def test_a_reader_unmaps_a_killed_owners_segments_once_no_view_of_them_remains():
    st = store.current()
    store.stats()
    fds0, maps0, shm0 = open_fds(), st.maps.count(), shmem_mib()
    for cycle in range(8):
        pid, refs = fork_owner(st.job_dir, [1 * MiB, 2 * MiB, 24 * MiB])
        values = [store.get(r) for r in refs]
        assert [v[0].item() for v in values] == [0.0, 1.0, 2.0]
        assert mapped_windows(pid) == 2            # its arena and its large window
        del values, refs
        kill(pid)
        assert wait_for(lambda pid=pid: mapped_windows(pid) == 0, 2.0), f"cycle {cycle}: still mapped"
    assert st.maps.count() == maps0
    assert open_fds() <= fds0 + 1
    assert shmem_mib() < shm0 + 64 + 16, (shm0, shmem_mib())       # within one arena (others' noise aside)


def test_a_live_view_of_a_dead_owner_keeps_only_its_own_window():
    st = store.current()
    pid, refs = fork_owner(st.job_dir, [1 * MiB, 24 * MiB, 24 * MiB])
    small, big, other = (store.get(r) for r in refs)
    assert mapped_windows(pid) == 3
    del refs, big, other
    kill(pid)
    assert wait_for(lambda: mapped_windows(pid) == 1, 2.0)
    assert small[0].item() == 0.0 and small.sum().item() == 0.0      # still valid memory
    del small
    assert wait_for(lambda pid=pid: mapped_windows(pid) == 0, 2.0)


def test_a_stale_ref_of_a_dead_owner_raises_owner_died_after_its_mappings_went():
    st = store.current()
    pid, refs = fork_owner(st.job_dir, [1 * MiB])
    assert store.get(refs[0])[0].item() == 0.0
    kill(pid)
    assert wait_for(lambda pid=pid: mapped_windows(pid) == 0, 2.0)
    with pytest.raises(OwnerDiedError):
        store.get(refs[0])


# -- borrowed refs that come back nested in results ---------------------------------------------

@ta.actor(num_threads=1)
class Borrower(StoreProcess):
    def echo(self, obj):
        return obj

    def fds(self) -> int:
        return open_fds()

    def touch(self, t: torch.Tensor) -> float:
        return float(t[0])


@pytest.fixture(scope="module")
def borrower():
    ta.init(num_threads=1)
    h = Borrower.remote()
    ta.get(h.echo.remote({"warm": store.put(torch.zeros(4))}))
    yield h
    ta.kill(h)


def test_a_borrowed_ref_returned_nested_in_a_result_is_released_once_nobody_holds_it(borrower):
    base = store.stats()
    for i in range(40):
        ref = store.put(torch.full((MiB,), float(i)))         # 4 MiB
        back = ta.get(borrower.echo.remote({"ref": ref}))
        assert back["ref"] == ref and store.get(back["ref"])[0].item() == float(i)
        del ref, back
        # constant memory as it goes, not only at the end
        assert store.stats()["objects"] <= base["objects"] + 4, (i, store.stats())
    assert wait_for(lambda: store.stats()["objects"] <= base["objects"]
                    and store.stats()["bytes_used"] <= base["bytes_used"], 3.0), (base, store.stats())


def test_a_borrowed_ref_kept_in_an_idle_actors_result_is_released_when_dropped(borrower):
    base = store.stats()["objects"]
    ref = store.put(torch.ones(MiB))
    out = borrower.echo.remote([ref])
    assert ta.get(out)[0] == ref
    del ref, out                    # the actor puts nothing more: its watcher must release
    assert wait_for(lambda: store.stats()["objects"] <= base, 3.0), store.stats()


# -- shared tensors: no descriptor per put --------------------------------------------------------

def test_10000_puts_of_shared_tensors_keep_descriptors_flat():
    one = torch.zeros(64).share_memory_()
    store.get(store.put(one))
    fds0 = open_fds()
    peak = 0
    for i in range(10_000):
        t = one if i % 2 else torch.zeros(16).share_memory_()
        ref = store.put(t)
        assert store.get(ref).shape == t.shape
        del ref, t
        if i % 500 == 0:
            peak = max(peak, open_fds())
    assert peak <= fds0 + 40, (fds0, peak)
    assert wait_for(lambda: open_fds() <= fds0 + 2, 3.0), (fds0, open_fds())


def test_shared_tensors_as_call_arguments_keep_descriptors_flat_on_both_sides(borrower):
    t = torch.zeros(64).share_memory_()
    ta.get(borrower.touch.remote(t))
    mine0, theirs0 = open_fds(), ta.get(borrower.fds.remote())
    for i in range(600):
        arg = t if i % 2 else torch.full((8,), float(i)).share_memory_()
        assert ta.get(borrower.touch.remote(arg)) == float(arg[0])
        del arg
    assert wait_for(lambda: open_fds() <= mine0 + 2, 3.0), (mine0, open_fds())
    assert wait_for(lambda: ta.get(borrower.fds.remote()) <= theirs0 + 2, 3.0)


# -- large objects and descriptor limits -----------------------------------------------------------

LIMITED = textwrap.dedent("""
    import os, resource, sys, torch
    from torchactors.store import core
    from torchactors.errors import StoreFullError
    n, size, extra, capacity = (int(a) for a in sys.argv[1:5])
    store = core.Store(capacity=capacity)
    store.put(torch.zeros(1))
    limit = len(os.listdir("/proc/self/fd")) + extra
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    refs = []
    try:
        for i in range(n):
            refs.append(store.put(torch.empty(size, dtype=torch.uint8)))
        print("ok", len(refs), len(os.listdir("/proc/self/fd")), limit)
    except StoreFullError as e:
        print("full", len(refs), str(e).replace(chr(10), " "))
""")


def run_limited(n: int, size: int, extra: int, capacity: int = 8 << 30) -> str:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", LIMITED, str(n), str(size), str(extra), str(capacity)],
                         capture_output=True, text=True, timeout=300, env=env)
    return out.stdout.strip() or out.stderr[-2000:]


def test_large_objects_do_not_cost_a_descriptor_each():
    out = run_limited(40, 17 * MiB, 8).split()
    assert out[0] == "ok" and int(out[1]) == 40, out


def test_reaching_the_descriptor_limit_is_a_store_full_error_naming_rlimit_nofile():
    out = run_limited(400, 17 * MiB, 0, capacity=16 << 30)
    assert out.startswith("full"), out
    assert "RLIMIT_NOFILE" in out and "ulimit -n" in out, out


@pytest.mark.slow
def test_200_live_objects_of_17_mib_work_under_ulimit_n_256():
    code = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); " \
           "import torch; from torchactors import store; " \
           "refs = [store.put(torch.empty(17 << 20, dtype=torch.uint8)) for _ in range(200)]; print(len(refs))"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.stdout.strip() == "200", out.stderr[-2000:]


# -- a put that can never fit ---------------------------------------------------------------------

def test_a_put_bigger_than_the_store_fails_at_once_with_the_bytes_asked():
    st = core.Store(capacity=64 * MiB)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreFullError) as info:
            st.put(torch.empty(70 * MiB + 3, dtype=torch.uint8), timeout=30)
        assert time.monotonic() - t0 < 1.0
        assert info.value.requested == 70 * MiB + 3 and info.value.capacity == 64 * MiB
        assert str(70 * MiB + 3) in str(info.value)
    finally:
        st.close()


def test_an_argument_too_big_for_the_store_raises_store_full_not_type_error():
    from torchactors.actors.calls import encode_args
    st = core.Store(capacity=32 * MiB)
    try:
        with pytest.raises(StoreFullError) as info:
            encode_args((torch.empty(40 * MiB, dtype=torch.uint8),), {}, st.put)
        assert info.value.requested == 40 * MiB
    finally:
        st.close()


# -- soaks with real actors (slow) ----------------------------------------------------------------

@ta.actor(num_threads=1, max_restarts=1000, restart_backoff={"fast": 1000})    # a soak of restarts, not of back-off
class Flaky(StoreProcess):
    def rollout(self, n: int) -> torch.Tensor:
        return torch.full((n,), float(os.getpid()))


def foreign_windows() -> int:
    """Mappings in this process of other processes' store segments."""
    own = f"memfd:torchactors-{os.getpid()}-"
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "memfd:torchactors-" in line and own not in line and "table" not in line)


def restarted(h, old_pid: int) -> bool:
    try:
        return ta.get(h.pid.remote(), timeout=60) != old_pid
    except ta.ActorDiedError:          # still restarting
        return False


def kill_cycles(cycles: int) -> None:
    h = Flaky.remote()
    assert ta.get(h.rollout.remote(16)).numel() == 16
    store.stats()
    fds0, maps0, shm0 = open_fds(), foreign_windows(), shmem_mib()
    for _ in range(cycles):
        pid = ta.get(h.pid.remote(), timeout=60)
        got = ta.get(h.rollout.remote(MiB))              # 4 MiB result, read here
        assert got[0].item() == float(pid)
        del got
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda pid=pid: restarted(h, pid), 60.0)
    assert wait_for(lambda: foreign_windows() <= maps0 + 1, 3.0), (maps0, foreign_windows())
    assert wait_for(lambda: open_fds() <= fds0 + 2, 3.0), (fds0, open_fds())
    assert shmem_mib() < shm0 + 64 + 32, (shm0, shmem_mib())       # within one arena (others' noise aside)
    ta.kill(h)


@pytest.mark.slow
def test_50_sigkill_and_restart_cycles_leave_fds_mappings_and_shmem_at_the_baseline(borrower):
    kill_cycles(50)


def test_more_tensor_arguments_than_a_process_can_own_raise_store_full_naming_the_figures():
    from torchactors.actors.calls import encode_args
    st = core.Store(capacity=256 * MiB)
    try:
        args = tuple(torch.full((2,), float(i)) for i in range(70_000))
        with pytest.raises(StoreFullError) as info:
            encode_args(args, {}, st.put)
        err = info.value
        assert err.requested == 8 and err.capacity == 256 * MiB and "objects" in str(err)
    finally:
        st.close()


# -- objects that never left their owner ----------------------------------------------------------

def test_an_object_no_ref_ever_left_is_released_at_the_next_put_into_the_same_block():
    st = store.current()
    ref = st.put(torch.full((1024,), 1.0))
    place = (ref.loc.fd, ref.loc.file_off + ref.loc.offset)
    objects = len(st.entries)
    del ref
    again = st.put(torch.full((1024,), 2.0))        # the block still in the cache is reused
    assert (again.loc.fd, again.loc.file_off + again.loc.offset) == place
    assert len(st.entries) == objects and not st.candidates
    assert st.get(again)[0].item() == 2.0


def test_an_object_whose_ref_was_pickled_lives_while_another_process_holds_it():
    st = store.current()
    ref = st.put(torch.full((1024,), 7.0))
    blob = pickle.dumps(ref)            # the ref left this process: only a reclaim pass may free it
    held = []
    pid, _ = fork_store_process(st.job_dir, lambda child: held.append(pickle.loads(blob)))
    try:
        del ref
        for i in range(50):
            st.put(torch.full((1024,), float(i)))
        store.stats()                   # a reclaim pass: the child's hold still counts
        assert store.get(pickle.loads(blob)).tolist() == [7.0] * 1024
    finally:
        kill(pid)


# -- what the store tells an operator ------------------------------------------------------------

def test_a_dead_owner_and_a_full_store_are_logged_with_their_figures(caplog):
    caplog.set_level(logging.INFO, logger="torchactors.store.core")
    st = store.current()
    pid, refs = fork_owner(st.job_dir, [4096])
    assert store.get(refs[0])[0].item() == 0.0
    del refs
    kill(pid)
    assert wait_for(lambda: any(f"process {pid} " in r.getMessage() and "died" in r.getMessage()
                                for r in caplog.records), 3.0), caplog.text
    small = core.Store(capacity=4 * MiB)
    try:
        held = [small.put(torch.empty(MiB // 4 * 3, dtype=torch.float32))]
        with pytest.raises(StoreFullError):
            small.put(torch.empty(MiB // 4 * 3, dtype=torch.float32))
        full = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
        assert full and str(3 * MiB) in full[-1] and str(4 * MiB) in full[-1], full
        del held
    finally:
        small.close()
