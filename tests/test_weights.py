"""ta.Weights: versioned state dicts across real processes — no torn reads, views kept valid,
publisher death, flat memory over many publications."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

import pytest
import torch
from conftest import counted_fds

import torchactors as ta


def constant_sd(value: float) -> dict:
    """A state dict whose every tensor equals ``value`` (two dtypes: two buckets)."""
    return collections.OrderedDict(
        [("layer.weight", torch.full((64, 32), value)), ("layer.bias", torch.full((64,), value)),
         ("steps", torch.full((3,), int(value), dtype=torch.int64)), ("scalar", torch.tensor(value))])


def check_constant(v: int, sd: dict) -> bool:
    return all(bool((t == v).all()) for t in sd.values())


@ta.actor(num_threads=1)
class Reader:
    def __init__(self, name: str) -> None:
        self.w = ta.Weights(name)

    def pid(self) -> int:
        return os.getpid()

    def check_until(self, last: int) -> dict:
        """Read in a loop from before the first publication until version ``last``; count the
        versions whose tensors are not all their version's constant."""
        v, sd = self.w.wait_newer(0, timeout=60)
        reads = torn = 0
        seen = set()
        while True:
            reads += 1
            seen.add(v)
            if not check_constant(v, sd) or list(sd) != ["layer.weight", "layer.bias", "steps", "scalar"]:
                torn += 1
            if v >= last:
                break
            v, sd = self.w.latest()
        return {"reads": reads, "torn": torn, "distinct": len(seen), "mapped": ta.store.stats()["mapped_segments"]}

    def latest_sum(self) -> tuple:
        v, sd = self.w.latest()
        return v, None if sd is None else float(sum(t.double().sum() for t in sd.values()))

    def hold_and_recheck(self, seconds: float) -> tuple:
        v, sd = self.w.latest()
        before = {k: t.clone() for k, t in sd.items()}
        time.sleep(seconds)
        return v, all(torch.equal(before[k], sd[k]) for k in sd)

    def wait_for_newer(self, v: int, timeout: float) -> str:
        try:
            self.w.wait_newer(v, timeout=timeout)
            return "newer"
        except ta.OwnerDiedError:
            return "OwnerDiedError"
        except ta.GetTimeoutError:
            return "timeout"


@ta.actor(num_threads=1)
class Publisher:
    def __init__(self, name: str) -> None:
        self.w = ta.Weights(name)

    def pid(self) -> int:
        return os.getpid()

    def publish(self, value: float) -> int:
        return self.w.publish(constant_sd(value))


def test_structure_keys_and_values_come_back():
    w = ta.Weights("structure")
    assert w.latest() == (0, None)
    sd = {"a": torch.arange(6.0).view(2, 3), "nested": [torch.ones(2, dtype=torch.int32), {"x": torch.tensor(7)}],
          "meta": ("step", 3), "empty": torch.empty(0, 4)}
    assert w.publish(sd) == 1
    v, got = w.latest()
    assert v == 1 and type(got) is dict and list(got) == list(sd)
    assert torch.equal(got["a"], sd["a"]) and got["a"].shape == (2, 3)
    assert got["nested"][0].dtype == torch.int32 and torch.equal(got["nested"][0], sd["nested"][0])
    assert int(got["nested"][1]["x"]) == 7 and got["meta"] == ("step", 3) and got["empty"].shape == (0, 4)
    assert w.publish(constant_sd(2.0)) == 2
    v, got = w.latest()
    assert v == 2 and type(got) is collections.OrderedDict and check_constant(2, got)


def test_one_bucket_per_dtype_and_views_into_it():
    w = ta.Weights("buckets")
    w.publish(constant_sd(1.0))
    _, sd = w.latest()
    f32 = [t for t in sd.values() if t.dtype == torch.float32]
    assert len({t.untyped_storage().data_ptr() for t in f32}) == 1        # one bucket, views into it
    assert sd["steps"].untyped_storage().data_ptr() != f32[0].untyped_storage().data_ptr()


def test_readers_in_actors_never_see_a_torn_version_over_10000_publications():
    readers = [Reader.remote("torn") for _ in range(2)]
    ta.get([r.pid.remote() for r in readers])
    last = 10_000
    runs = [r.check_until.remote(last) for r in readers]       # they wait in wait_newer(0)
    time.sleep(0.2)
    w = ta.Weights("torn")
    for v in range(1, last + 1):
        assert w.publish(constant_sd(float(v))) == v
    for out in ta.get(runs, timeout=120):
        assert out["torn"] == 0
        assert out["reads"] > 10 and out["distinct"] > 2
        assert out["mapped"] <= 4           # control segment + the buckets' segments, mapped once
    for r in readers:
        ta.kill(r)


def test_a_held_state_dict_is_never_overwritten():
    w = ta.Weights("held")
    w.publish(constant_sd(1.0))
    reader = Reader.remote("held")
    ta.get(reader.pid.remote())
    held = reader.hold_and_recheck.remote(1.0)
    time.sleep(0.5)
    v0, sd0 = w.latest()
    for v in range(2, 200):
        w.publish(constant_sd(float(v)))
    assert ta.get(held, timeout=30) == (1, True)
    assert check_constant(v0, sd0)
    ta.kill(reader)


def test_a_version_held_in_the_driver_survives_an_actor_publishing_many_more():
    # The publisher is not process 0 here (the IMPALA learner's case): it must read the
    # driver's holds in the column the driver keeps for that process's objects.
    publisher = Publisher.remote("from-actor")
    assert ta.get(publisher.publish.remote(1.0), timeout=60) == 1
    w = ta.Weights("from-actor")
    v0, sd0 = w.latest()
    assert v0 == 1 and check_constant(1, sd0)
    for v in range(2, 50):
        assert ta.get(publisher.publish.remote(float(v)), timeout=30) == v
    assert check_constant(1, sd0)                   # never overwritten while held here
    v, sd = w.latest()
    assert v == 49 and check_constant(49, sd)
    ta.kill(publisher)


def test_publisher_waits_when_every_buffer_is_held_and_goes_on_when_one_is_dropped():
    w = ta.Weights("bounded", max_buffers=2)
    w.publish(constant_sd(1.0))
    held = [w.latest()]
    w.publish(constant_sd(2.0))
    held.append(w.latest())             # both buffer sets are held now

    def drop_later():
        time.sleep(0.5)
        held.pop(0)
    t = threading.Thread(target=drop_later)
    t.start()
    start = time.monotonic()
    assert w.publish(constant_sd(3.0)) == 3
    assert time.monotonic() - start >= 0.4
    t.join()
    assert check_constant(*held[0]) and check_constant(*w.latest())


def test_a_killed_reader_does_not_pin_the_version_it_held():
    w = ta.Weights("dead-reader", max_buffers=2)
    w.publish(constant_sd(1.0))
    reader = Reader.remote("dead-reader")
    pid = ta.get(reader.pid.remote())
    reader.hold_and_recheck.remote(60.0)          # holds version 1 for a minute
    time.sleep(0.5)
    w.publish(constant_sd(2.0))                   # the other buffer set: fine while it holds 1
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    w.publish(constant_sd(3.0))                   # needs version 1's buffer set: its holder is dead
    assert time.monotonic() - start < 2.0 and check_constant(*w.latest())
    ta.kill(reader)


def test_wait_newer_times_out_and_wakes_on_publication():
    w = ta.Weights("timeouts")
    with pytest.raises(ta.GetTimeoutError):
        w.wait_newer(0, timeout=0.2)
    w.publish(constant_sd(1.0))
    with pytest.raises(ta.GetTimeoutError):
        w.wait_newer(1, timeout=0.2)
    threading.Timer(0.2, lambda: w.publish(constant_sd(2.0))).start()
    start = time.monotonic()
    v, sd = w.wait_newer(1, timeout=10)
    assert v == 2 and check_constant(2, sd) and time.monotonic() - start < 2


def test_a_name_published_in_an_actor_is_read_in_the_driver_and_other_actors():
    pub = Publisher.remote("from-actor")
    reader = Reader.remote("from-actor")
    assert ta.get(reader.latest_sum.remote()) == (0, None)
    assert ta.get(pub.publish.remote(3.0)) == 1
    v, sd = ta.Weights("from-actor").wait_newer(0, timeout=10)
    assert v == 1 and check_constant(3, sd)
    assert ta.get(reader.latest_sum.remote())[0] == 1
    with pytest.raises(ValueError, match="already published"):
        ta.Weights("from-actor").publish(constant_sd(1.0))
    ta.kill(pub)
    ta.kill(reader)


def test_publisher_death_makes_waits_raise_owner_died_at_once_and_keeps_the_last_version():
    pub = Publisher.remote("dies")
    reader = Reader.remote("dies")
    assert ta.get(pub.publish.remote(5.0)) == 1
    w = ta.Weights("dies")
    v, sd = w.wait_newer(0, timeout=10)
    blocked = reader.wait_for_newer.remote(1, 30.0)
    errors = []

    def driver_wait():
        try:
            w.wait_newer(1, timeout=30)
        except ta.OwnerDiedError as exc:
            errors.append((time.monotonic(), exc))
    t = threading.Thread(target=driver_wait)
    t.start()
    time.sleep(0.3)
    killed = time.monotonic()
    os.kill(ta.get(pub.pid.remote()), signal.SIGKILL)
    t.join(10)
    assert errors and errors[0][0] - killed < 1.0
    assert ta.get(blocked, timeout=10) == "OwnerDiedError"
    start = time.monotonic()
    with pytest.raises(ta.OwnerDiedError):
        w.wait_newer(1, timeout=30)
    assert time.monotonic() - start < 1.0
    assert v == 1 and check_constant(5, sd)         # what a reader already holds stays valid
    ta.kill(reader)
    ta.kill(pub)


def test_load_into_copies_the_newest_version():
    src, dst = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    w = ta.Weights("module")
    assert w.load_into(dst) == 0
    w.publish(src.state_dict())
    assert w.load_into(dst) == 1
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)
    assert dst.weight.untyped_storage().data_ptr() != w.latest()[1]["weight"].untyped_storage().data_ptr()


def test_publishing_10000_versions_allocates_nothing_in_steady_state():
    w = ta.Weights("flat")
    reader = Reader.remote("flat")
    for v in range(1, 101):
        w.publish(constant_sd(float(v)))
        ta.get(reader.latest_sum.remote())
    fds, stats = counted_fds(), ta.stats()
    for v in range(101, 10_001):
        w.publish(constant_sd(float(v)))
        if v % 100 == 0:
            assert ta.get(reader.latest_sum.remote())[0] == v
        if v % 1000 == 0:
            assert w.latest()[0] == v
    after = ta.stats()
    assert counted_fds() <= fds
    assert after["segments"] == stats["segments"] and after["objects"] == stats["objects"]
    assert after["bytes_used"] == stats["bytes_used"]
    ta.kill(reader)


def test_bad_names_and_bounds_are_refused():
    with pytest.raises(ValueError, match="non-empty string"):
        ta.Weights("")
    with pytest.raises(ValueError, match="max_buffers"):
        ta.Weights("x", max_buffers=1)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_weights_are_one_bucket_per_dtype_and_never_torn():
    w = ta.Weights("cuda")
    reader = Reader.remote("cuda")
    sd = {k: t.cuda() for k, t in constant_sd(1.0).items()}
    w.publish(sd)
    v, got = w.latest()
    assert got["layer.weight"].is_cuda and check_constant(v, got)
    f32 = [t for t in got.values() if t.dtype == torch.float32]
    assert len({t.untyped_storage().data_ptr() for t in f32}) == 1
    run = reader.check_until.remote(2000)
    for v in range(2, 2001):
        w.publish({k: t.fill_(v) for k, t in sd.items()})
    assert ta.get(run, timeout=120)["torn"] == 0
    ta.kill(reader)
