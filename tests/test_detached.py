"""A detached actor started by an actor outlives its creator (Ray's rule), and still ends
with the job (local backend; tests/test_ray_ported.py::test_child_actor_lifetime is Ray's port)."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

import torchactors as ta


@ta.remote
class Child:
    def pid(self):
        return os.getpid()


@ta.remote
class Creator:
    def make(self):
        self.child = Child.options(lifetime="detached").remote()
        return self.child, ta.get(self.child.pid.remote(), timeout=60)

    def pid(self):
        return os.getpid()


def _gone(pid: int, timeout: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


@pytest.mark.slow       # each test starts a job and two zygotes: ~5 s
@pytest.mark.parametrize("how", ["sigkill", "ta.kill"])
def test_outlives_its_creator_and_ends_with_the_job(how):
    ta.init()
    try:
        creator = Creator.remote()
        child, child_pid = ta.get(creator.make.remote(), timeout=60)
        creator_pid = ta.get(creator.pid.remote(), timeout=60)
        if how == "sigkill":
            os.kill(creator_pid, signal.SIGKILL)
        else:
            ta.kill(creator)        # the creator's runtime shuts down: it spares the detached child
        assert _gone(creator_pid, 10)
        assert ta.get(child.pid.remote(), timeout=30) == child_pid
    finally:
        ta.shutdown()
    assert _gone(child_pid, 5), "the detached actor outlived the job"


@pytest.mark.slow
def test_killed_after_its_creator_died():
    ta.init()
    try:
        creator = Creator.remote()
        child, child_pid = ta.get(creator.make.remote(), timeout=60)
        creator_pid = ta.get(creator.pid.remote(), timeout=60)
        os.kill(creator_pid, signal.SIGKILL)
        assert _gone(creator_pid, 10)
        ta.kill(child)
        assert _gone(child_pid, 5)
        with pytest.raises(ta.ActorDiedError, match="killed"):
            ta.get(child.pid.remote(), timeout=30)
    finally:
        ta.shutdown()
