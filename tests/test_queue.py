"""ta.Queue across real processes: order per producer, several consumers, backpressure,
timeouts, tensors by ref, the host's death, and flat memory over 100,000 items."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time

import pytest
import torch
from conftest import counted_fds

import torchactors as ta


@ta.actor(num_threads=1)
class Worker:
    def __init__(self) -> None:
        self.kept = None

    def pid(self) -> int:
        return os.getpid()

    def produce(self, q: ta.Queue, tag: int, n: int, batch: int = 1) -> int:
        items = [(tag, i) for i in range(n)]
        for i in range(0, n, batch):
            if batch == 1:
                q.put(items[i])
            else:
                q.put_many(items[i:i + batch])
        return n

    def consume(self, q: ta.Queue, n: int, batch: int = 1) -> list:
        out = []
        while len(out) < n:
            out.extend(q.get_many(min(batch, n - len(out)), timeout=60) if batch > 1 else [q.get(timeout=60)])
        return out

    def consume_tensors(self, q: ta.Queue, n: int, batch: int) -> dict:
        total = 0.0
        for _ in range(n // batch):
            for t in q.get_many(batch, timeout=60):
                total += float(t[0])
        return {"total": total, "mapped": ta.store.stats()["mapped_segments"]}

    def fill_next(self, q: ta.Queue, value: float) -> None:
        q.get(timeout=30).fill_(value)

    def die_holding_the_producers_mutex(self, q: ta.Queue) -> None:
        from torchactors.actors import queue as queue_module
        queue_module._acquire(q._ring.mutexes[queue_module._PRODUCERS])
        os._exit(3)

    def host(self, maxsize: int) -> ta.Queue:
        self.kept = ta.Queue(maxsize)
        return self.kept

    def put_into_kept(self, x) -> None:
        self.kept.put(x)


@pytest.fixture(scope="module")
def workers():
    ws = [Worker.remote() for _ in range(2)]
    ta.get([w.pid.remote() for w in ws])
    yield ws
    for w in ws:
        ta.kill(w)


def test_fifo_and_the_standard_library_exceptions():
    q = ta.Queue()
    for i in range(10):
        q.put(i)
    q.put_many([10, 11, 12])
    assert q.qsize() == 13 and not q.empty() and not q.full()
    assert [q.get() for _ in range(3)] == [0, 1, 2]
    assert q.get_many(10) == list(range(3, 13))
    assert q.empty()
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get_many(2, block=False)
    small = ta.Queue(maxsize=2)
    small.put_nowait("a")
    small.put("b")
    assert small.full()
    with pytest.raises(queue.Full):
        small.put_nowait("c")
    with pytest.raises(queue.Full):
        small.put_many(["c", "d"], block=False)
    with pytest.raises(ValueError, match="never fit"):
        small.put_many([1, 2, 3])
    with pytest.raises(ValueError, match="maxsize"):
        ta.Queue(-1)


def test_timeouts_raise_after_the_timeout():
    q = ta.Queue(maxsize=1)
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    assert 0.19 <= time.monotonic() - start < 2
    q.put(1)
    start = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(2, timeout=0.2)
    assert 0.19 <= time.monotonic() - start < 2


def test_a_full_queue_blocks_the_producer_until_a_consumer_takes(workers):
    q = ta.Queue(maxsize=3)
    done = workers[0].produce.remote(q, 0, 50)
    time.sleep(0.5)
    assert q.qsize() == 3 and q.full()             # the producer is blocked: backpressure
    assert not ta.wait([done], timeout=0)[0]
    got = [q.get(timeout=10) for _ in range(50)]
    assert got == [(0, i) for i in range(50)] and ta.get(done) == 50


def test_two_producers_keep_their_own_order(workers):
    q = ta.Queue(maxsize=100)
    runs = [workers[0].produce.remote(q, 0, 3000), workers[1].produce.remote(q, 1, 3000, 7)]
    got = [q.get(timeout=30) for _ in range(6000)]
    ta.get(runs)
    for tag in (0, 1):
        assert [i for t, i in got if t == tag] == list(range(3000))


def test_two_consumers_take_each_item_once(workers):
    q = ta.Queue(maxsize=64)
    runs = [workers[0].consume.remote(q, 1500), workers[1].consume.remote(q, 1500, 10)]
    for i in range(0, 3000, 30):
        q.put_many([(9, j) for j in range(i, i + 30)])
    a, b = ta.get(runs, timeout=60)
    assert sorted(a + b) == [(9, j) for j in range(3000)]
    assert a == sorted(a) and b == sorted(b)        # each consumer sees the producer's order


def test_tensors_travel_by_ref_not_by_copy(workers):
    q = ta.Queue()
    t = torch.zeros(1000).share_memory_()
    q.put(t)
    ta.get(workers[0].fill_next.remote(q, 7.0))
    assert bool((t == 7).all())                     # the consumer wrote into our very bytes
    q.put({"x": torch.arange(5), "n": 3})
    out = q.get()
    assert torch.equal(out["x"], torch.arange(5)) and out["n"] == 3


def test_large_items_go_through_the_store():
    q = ta.Queue()
    big = b"y" * (3 << 20)
    q.put([big, "tail"])
    assert q.get() == [big, "tail"]


def test_queue_host_death_fails_blocked_and_later_calls_within_a_second():
    host = Worker.remote()
    q = ta.get(host.host.remote(0))
    ta.get(host.put_into_kept.remote("first"))
    assert q.get(timeout=10) == "first"
    errors = []

    def blocked_get():
        try:
            q.get()
        except ta.ActorDiedError:
            errors.append(time.monotonic())
    t = threading.Thread(target=blocked_get)
    t.start()
    time.sleep(0.3)
    killed = time.monotonic()
    os.kill(ta.get(host.pid.remote()), signal.SIGKILL)
    t.join(5)
    assert errors and errors[0] - killed < 1.0
    for call in (lambda: q.put(1), lambda: q.get(timeout=5), q.qsize):
        start = time.monotonic()
        with pytest.raises(ta.ActorDiedError, match="queue host"):
            call()
        assert time.monotonic() - start < 1.0
    ta.kill(host)


def test_100000_items_leave_fds_and_the_store_flat(workers):
    q = ta.Queue(maxsize=2000)
    small = torch.ones(4)
    run = workers[0].consume_tensors.remote(q, 1000, 100)
    for _ in range(10):
        q.put_many([small] * 100)
    fds, stats = counted_fds(), ta.stats()
    mapped = ta.get(run)["mapped"]
    run = workers[0].consume_tensors.remote(q, 100_000, 500)
    for _ in range(200):
        q.put_many([small] * 500)
    out = ta.get(run, timeout=120)
    assert out["total"] == 100_000 and out["mapped"] == mapped
    q.qsize()                                        # lets go of the refs of consumed items
    after = ta.stats()
    assert counted_fds() <= fds
    assert after["segments"] == stats["segments"] and after["objects"] <= stats["objects"]
    plain = ta.Queue()
    for i in range(0, 100_000, 1000):
        plain.put_many(list(range(i, i + 1000)))
        assert plain.get_many(1000)[-1] == i + 999
    assert counted_fds() <= fds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_travel_by_ipc_handle(workers):
    q = ta.Queue()
    t = torch.zeros(1000, device="cuda")
    q.put(t)
    ta.get(workers[0].fill_next.remote(q, 5.0))
    torch.cuda.synchronize()
    assert bool((t == 5).all())                     # the consumer wrote into our GPU bytes


def test_a_producer_killed_in_a_tight_put_loop_never_jams_the_queue():
    """It may die holding the producers' mutex: the robust mutex passes to the next taker."""
    producer = Worker.remote()
    pid = ta.get(producer.pid.remote())
    q = ta.Queue(maxsize=50)
    producer.produce.remote(q, 0, 200_000)
    for _ in range(200):
        q.get(timeout=10)
    os.kill(pid, signal.SIGKILL)
    while True:                                  # drain what it managed to put
        try:
            q.get_nowait()
        except queue.Empty:
            break
    start = time.monotonic()
    q.put_many(list(range(50)), timeout=5)
    assert q.get_many(50, timeout=5) == list(range(50)) and time.monotonic() - start < 1.0
    ta.kill(producer)
    # And deterministically: a process that dies right after taking the mutex.
    doomed = Worker.remote()
    with pytest.raises(ta.ActorDiedError):
        ta.get(doomed.die_holding_the_producers_mutex.remote(q), timeout=30)
    start = time.monotonic()
    q.put("after", timeout=5)
    assert q.get(timeout=5) == "after" and time.monotonic() - start < 1.0
    ta.kill(doomed)
