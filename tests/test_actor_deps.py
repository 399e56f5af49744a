"""A constructor argument that is the ref of an unfinished call: ``.remote()`` returns at once
and the actor starts once the call is done (Ray's rule; local backend)."""

from __future__ import annotations

import time

import pytest
from test_ray_semantics import SignalActor

import torchactors as ta


@pytest.fixture(scope="module", autouse=True)
def runtime():
    ta.init()
    yield


@ta.remote
class Holder:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


@ta.remote
class Source:
    def fail(self):
        raise ValueError("no value")


def test_started_once_the_argument_is_ready():
    s = SignalActor.remote()
    started = time.monotonic()
    h = Holder.remote(s.wait.remote())
    assert time.monotonic() - started < 1.0       # .remote() did not wait for the call
    ref = h.get.remote()
    assert not ta.wait([ref], timeout=0.5)[0]      # not started while the argument is pending
    ta.get(s.send.remote(), timeout=60)
    assert ta.get(ref, timeout=60) is None          # SignalActor.wait returns None


def test_a_failed_argument_kills_the_actor():
    s = SignalActor.remote()
    src = Source.remote()

    @ta.remote
    class Chain:
        async def fail_after_signal(self, s, src):
            await s.wait.remote()
            return await src.fail.remote()

    h = Holder.remote(Chain.remote().fail_after_signal.remote(s, src))
    ta.get(s.send.remote(), timeout=60)
    with pytest.raises(ta.ActorDiedError, match="no value"):
        ta.get(h.get.remote(), timeout=60)


def test_killed_before_it_started():
    s = SignalActor.remote()
    h = Holder.remote(s.wait.remote())
    ta.kill(h)
    started = time.monotonic()
    with pytest.raises(ta.ActorDiedError):
        ta.get(h.get.remote(), timeout=60)
    assert time.monotonic() - started < 5.0
    ta.get(s.send.remote(), timeout=60)
