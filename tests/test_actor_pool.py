"""ta.ActorPool: Ray's own ActorPool tests, ported from ray-project/ray
python/ray/tests/test_actor_pool.py (same cases, same expectations; ``ray.remote`` ->
``ta.actor``, ``ray.util.ActorPool`` -> ``ta.ActorPool``), plus the dead-actor eviction."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from unittest.mock import MagicMock

import pytest

import torchactors as ta


@ta.actor(num_threads=1)
class MyActor:
    def f(self, x):
        return x + 1

    def double(self, x):
        return 2 * x

    def spin(self, x):
        while True:
            x = x + 1
            time.sleep(1)

    def pid(self):
        return os.getpid()


@ta.actor(num_threads=1)
class DummyActor:
    async def identity(self, s):
        if s == 6:
            await asyncio.sleep(10)
        return s, time.time()


@pytest.fixture(scope="module")
def four():
    actors = [MyActor.remote() for _ in range(4)]
    ta.get([a.pid.remote() for a in actors])
    yield actors
    for a in actors:
        ta.kill(a)


def test_get_next(four):
    pool = ta.ActorPool(four)
    for i in range(5):
        pool.submit(lambda a, v: a.f.remote(v), i)
        assert pool.get_next() == i + 1


def test_get_next_unordered(four):
    pool = ta.ActorPool(four)
    total = []
    for i in range(5):
        pool.submit(lambda a, v: a.f.remote(v), i)
    while pool.has_next():
        total += [pool.get_next_unordered()]
    assert sorted(total) == [1, 2, 3, 4, 5]


def test_map(four):
    pool = ta.ActorPool(four)
    for index, v in enumerate(pool.map(lambda a, v: a.double.remote(v), range(5))):
        assert v == 2 * index


def test_map_eager(four):
    """submit is called when map is called, not when its results are consumed."""
    pool = ta.ActorPool(four[:1])
    pool.submit = MagicMock()
    pool.map(lambda a, v: a.f.remote(v), range(1))
    pool.submit.assert_called()


def test_map_unordered(four):
    pool = ta.ActorPool(four)
    total = list(pool.map_unordered(lambda a, v: a.double.remote(v), range(5)))
    assert sorted(total) == [0, 2, 4, 6, 8]


def test_map_gh23107():
    """Reference: https://github.com/ray-project/ray/issues/23107 — a map after an unfetched
    submission returns only the map's own results."""
    def func(a, v):
        return a.identity.remote(v)

    actors = [DummyActor.remote() for _ in range(2)]
    ta.get([a.identity.remote(0) for a in actors])     # started: the clock is the pool's
    for method in ("map", "map_unordered"):
        pool = ta.ActorPool(actors)
        pool.submit(func, 6)
        start = time.time()
        results = list(getattr(pool, method)(func, [1, 2, 3, 4, 5]))
        assert sorted(r[0] for r in results) == [1, 2, 3, 4, 5]
        assert all(r[1] - start < 10 for r in results), (method, [(r[0], r[1] - start) for r in results])
    for a in actors:
        ta.kill(a)


def test_get_next_timeout():
    actor = MyActor.remote()
    pool = ta.ActorPool([actor])
    pool.submit(lambda a, v: a.spin.remote(v), 0)
    with pytest.raises(TimeoutError):
        pool.get_next_unordered(timeout=0.1)
    with pytest.raises(TimeoutError):
        pool.get_next(timeout=0.1)
    with pytest.raises(TimeoutError):
        pool.get_next(timeout=0.1, ignore_if_timedout=True)     # skipped now
    assert not pool.has_next()
    ta.kill(actor)


def test_get_next_unordered_timeout():
    actor = MyActor.remote()
    pool = ta.ActorPool([actor])
    pool.submit(lambda a, v: a.spin.remote(v), 0)
    with pytest.raises(TimeoutError):
        pool.get_next_unordered(timeout=0.1, ignore_if_timedout=False)
    assert pool.get_next_unordered(timeout=0.1, ignore_if_timedout=True) is None
    ta.kill(actor)


@pytest.mark.skipif(not hasattr(ta, "method"), reason="needs ta.method(num_returns=...)")
def test_multiple_returns():
    @ta.actor
    class Foo:
        @ta.method(num_returns=2)
        def bar(self):
            return 1, 2

    actors = [Foo.remote() for _ in range(2)]
    pool = ta.ActorPool(actors)
    for _ in range(4):
        pool.submit(lambda a, v: a.bar.remote(), None)
    while pool.has_next():
        assert pool.get_next(timeout=None) == [1, 2]
    pool.submit(lambda a, v: a.bar.remote(), None)
    pool.get_next(timeout=10, ignore_if_timedout=True)
    for a in actors:
        ta.kill(a)


def test_pop_idle(four):
    pool = ta.ActorPool(four[:1])
    pool.submit(lambda a, v: a.double.remote(v), 1)
    assert pool.pop_idle() is None
    assert pool.has_free() is False  # actor is busy
    assert pool.get_next() == 2
    assert pool.has_free()
    assert pool.pop_idle() is four[0]  # removes actor from pool
    assert pool.has_free() is False  # no more actors in pool


def test_push(four):
    a1, a2, a3 = four[:3]
    pool = ta.ActorPool([a1])
    pool.submit(lambda a, v: a.double.remote(v), 1)
    assert pool.has_free() is False  # actor is busy
    with pytest.raises(ValueError):
        pool.push(a1)
    pool.push(a2)
    assert pool.has_free()  # a2 is available
    pool.submit(lambda a, v: a.double.remote(v), 1)
    pool.submit(lambda a, v: a.double.remote(v), 1)
    assert pool.has_free() is False
    assert len(pool._pending_submits) == 1
    pool.push(a3)
    assert pool.has_free() is False  # a3 is used for pending submit
    assert len(pool._pending_submits) == 0
    while pool.has_next():
        assert pool.get_next() == 2


def test_an_actor_that_died_leaves_the_pool():
    doomed, other = MyActor.remote(), MyActor.remote()
    pid = ta.get(doomed.pid.remote())
    ta.get(other.pid.remote())
    pool = ta.ActorPool([other, doomed])      # submit takes from the end: doomed first
    pool.submit(lambda a, v: a.spin.remote(v), 0)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ta.ActorDiedError):
        pool.get_next(timeout=10)
    assert pool.pop_idle() is other and pool.pop_idle() is None
    ta.kill(doomed)
    ta.kill(other)
