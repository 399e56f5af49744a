"""Ray's actor semantics, ported from Ray's own tests (each test names the one it comes from).

Runs on the local backend by default, and on the Ray backend with TORCHACTORS_BACKEND=ray.
Ray's ``ray.`` is spelled ``ta.`` here; ``ray.test_utils.wait_for_pid_to_exit`` is a
psutil wait; Ray's ``SignalActor`` is defined below as in ``ray._private.test_utils``.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import threading
import time

import psutil
import pytest

import torchactors as ta

BACKEND = os.environ.get("TORCHACTORS_BACKEND", "local")
local_only = pytest.mark.skipif(BACKEND != "local", reason="exercises the local backend's own runtime")


@pytest.fixture(scope="module", autouse=True)
def runtime():
    ta.init(backend=BACKEND)
    yield
    ta.shutdown()


def wait_for_pid_to_exit(pid: int, timeout: float = 10.0) -> None:
    """ray.test_utils.wait_for_pid_to_exit."""
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass


def wait_for_condition(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@ta.remote
class SignalActor:
    """ray._private.test_utils.SignalActor: a sync method sets an asyncio.Event that an
    async method awaits (works only if both run on the actor's one event-loop thread)."""

    def __init__(self):
        self.ready_event = asyncio.Event()
        self.num_waiters = 0

    def send(self, clear=False):
        self.ready_event.set()
        if clear:
            self.ready_event.clear()

    async def wait(self, should_wait=True):
        if should_wait:
            self.num_waiters += 1
            await self.ready_event.wait()
            self.num_waiters -= 1

    async def cur_num_waiters(self):
        return self.num_waiters


# -- test_actor.py --------------------------------------------------------------------------

@ta.remote
class KwActor:
    def __init__(self, arg0, arg1=1, arg2="a"):
        self.arg0 = arg0
        self.arg1 = arg1
        self.arg2 = arg2

    def get_values(self, arg0, arg1=2, arg2="b"):
        return self.arg0 + arg0, self.arg1 + arg1, self.arg2 + arg2


def test_keyword_args():
    # Ray: test_actor.py::test_keyword_args
    actor = KwActor.remote(1, arg2="c")
    assert ta.get(actor.get_values.remote(0, arg2="d")) == (1, 3, "cd")
    assert ta.get(actor.get_values.remote(0, arg2="d", arg1=0)) == (1, 1, "cd")
    assert ta.get(actor.get_values.remote(arg2="d", arg1=0, arg0=2)) == (3, 1, "cd")
    # The constructor's arguments are checked at .remote(), in the caller.
    with pytest.raises(TypeError, match="missing a required argument"):
        KwActor.remote()
    with pytest.raises(TypeError):
        KwActor.remote(0, 1, 2, arg3=3)
    with pytest.raises(TypeError):
        KwActor.remote(0, arg0=1)
    with pytest.raises(TypeError, match="arg0"):
        ta.get(actor.get_values.remote())


def test_variable_number_of_args():
    # Ray: test_actor.py::test_variable_number_of_args
    @ta.remote
    class Actor:
        def __init__(self, *args):
            self.args = args

        def get_values(self, *args):
            return self.args, args

    a = Actor.remote(1, 2)
    assert ta.get(a.get_values.remote(3, 4)) == ((1, 2), (3, 4))


class Grandparent:
    GRANDPARENT = 2

    @staticmethod
    def grandparent_static():
        return 1


class Parent1(Grandparent):
    PARENT1 = 6


class Parent2:
    PARENT2 = 7


@ta.remote
class AttrActor(Parent1, Parent2):
    X = 3

    @classmethod
    def f(cls):
        assert AttrActor.GRANDPARENT == 2
        assert AttrActor.PARENT1 == 6
        assert AttrActor.PARENT2 == 7
        assert AttrActor.X == 3
        return 4

    @staticmethod
    def s():
        return 5

    def g(self):
        assert AttrActor.f() == 4
        assert isinstance(self, AttrActor)      # inside the actor the name still means the class
        return AttrActor.X


def test_actor_class_attributes():
    # Ray: test_actor.py::test_actor_class_attributes and test_actor_static_attributes
    t = AttrActor.remote()
    assert ta.get(t.g.remote()) == 3
    assert AttrActor.X == 3 and AttrActor.GRANDPARENT == 2
    assert AttrActor.s() == 5 and AttrActor.grandparent_static() == 1


def test_actor_class_attributes_of_a_class_defined_in_a_test():
    # Ray: test_actor.py::test_actor_class_attributes (the class is local to the test there)
    class Base:
        BASE = 2

    @ta.remote
    class TestActor(Base):
        X = 3

        @staticmethod
        def f():
            assert TestActor.BASE == 2
            return 4

        def g(self):
            assert TestActor.f() == 4
            return TestActor.X

    t = TestActor.remote()
    assert ta.get(t.g.remote()) == 3


def test_actor_inheritance():
    # Ray: test_actor.py::test_actor_inheritance
    class NonActorBase:
        def __init__(self):
            pass

    @ta.remote
    class ActorBase(NonActorBase):
        def __init__(self):
            pass

    with pytest.raises(Exception, match="Actors cannot be instantiated directly."):
        ActorBase()
    with pytest.raises(TypeError, match="Inheriting from actor classes is not currently supported"):
        class Derived(ActorBase):
            def __init__(self):
                pass


def test_decorator_args():
    # Ray: test_actor.py::test_decorator_args
    with pytest.raises(TypeError, match="needs options"):
        @ta.remote()
        class A:
            pass
    with pytest.raises(TypeError, match="invalid_kwarg"):
        @ta.remote(invalid_kwarg=0)
        class B:
            pass
    with pytest.raises(TypeError, match="invalid_kwarg"):
        @ta.remote(num_cpus=0, invalid_kwarg=0)
        class C:
            pass

    @ta.remote(num_cpus=1)
    class D:
        pass

    with pytest.raises(ValueError, match="concurrency groups are not supported"):
        D.options(concurrency_groups={"io": 2})
    with pytest.raises(TypeError, match="actors only"):
        @ta.remote
        def f():
            pass


def test_multiple_return_values():
    # Ray: test_actor.py::test_multiple_return_values
    @ta.remote
    class Foo:
        def method0(self):
            return 1

        @ta.method(num_returns=1)
        def method1(self):
            return 1

        @ta.method(num_returns=2)
        def method2(self):
            return 1, 2

        @ta.method(num_returns=3)
        def method3(self):
            return 1, 2, 3

        def pair(self):
            return "a", "b"

    f = Foo.remote()
    assert ta.get(f.method0.remote()) == 1
    assert ta.get(f.method1.remote()) == 1
    id2a, id2b = f.method2.remote()
    assert ta.get([id2a, id2b]) == [1, 2]
    id3a, id3b, id3c = f.method3.remote()
    assert ta.get([id3a, id3b, id3c]) == [1, 2, 3]
    a, b = f.pair.options(num_returns=2).remote()
    assert ta.get(b) == "b" and ta.get(a) == "a"
    ready, _ = ta.wait([a, b], num_returns=2, timeout=10)
    assert len(ready) == 2
    bad_a, _ = f.method0.options(num_returns=2).remote()
    with pytest.raises(Exception, match="num_returns=2"):
        ta.get(bad_a)


@ta.remote
class Pid:
    def getpid(self):
        return os.getpid()

    def method(self):
        return 1


@local_only
def test_actor_deletion():
    # Ray: test_actor.py::test_actor_deletion
    a = Pid.remote()
    pid = ta.get(a.getpid.remote())
    a = None
    wait_for_pid_to_exit(pid)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@ta.remote
class User:
    def use(self, actor, signal):
        ta.get(signal.wait.remote())
        return ta.get(actor.method.remote())


@local_only
def test_deleted_actor_no_restart():
    # Ray: test_actor_advanced.py::test_deleted_actor_no_restart (a task there, an actor here):
    # a handle passed to another process keeps the actor alive until that one drops it too.
    signal_actor = SignalActor.remote()
    a = Pid.options(max_restarts=3).remote()
    pid = ta.get(a.getpid.remote(), timeout=60)
    user = User.remote()
    x = user.use.remote(a, signal_actor)
    del a
    time.sleep(1.0)
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE     # the borrower still holds it
    ta.get(signal_actor.send.remote())
    assert ta.get(x, timeout=60) == 1
    wait_for_pid_to_exit(pid)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_actor_method_deletion():
    # Ray: test_actor.py::test_actor_method_deletion: the handle goes at once, the call still runs
    assert ta.get(Pid.remote().method.remote()) == 1


@local_only
def test_detached_and_named_actors_outlive_their_handles():
    # Ray: test_actor_advanced.py::test_detached_actor (within one job)
    a = Pid.options(lifetime="detached").remote()
    pid = ta.get(a.getpid.remote())
    del a
    n = Pid.options(name="kept").remote()
    del n
    time.sleep(1.0)
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert ta.get(ta.get_actor("kept").method.remote()) == 1
    ta.kill(ta.get_actor("kept"))


def test_ready():
    # Ray: test_actor.py (ray.get(a.__ray_ready__.remote()) in many tests)
    a = Pid.remote()
    assert ta.get(a.ready(), timeout=60) is True         # Ray's __ray_ready__ resolves to True
    assert ta.get(a.__ray_ready__.remote(), timeout=60) is True


def test_get_if_exists_and_namespaces():
    # Ray: test_actor_advanced.py::test_get_actor_if_exists (namespaces: test_namespace.py)
    a = Pid.options(name="same", get_if_exists=True).remote()
    b = Pid.options(name="same", get_if_exists=True).remote()
    assert ta.get(a.getpid.remote()) == ta.get(b.getpid.remote())
    c = Pid.options(name="same", namespace="other").remote()
    assert ta.get(c.getpid.remote()) != ta.get(a.getpid.remote())
    assert ta.get(ta.get_actor("same", namespace="other").getpid.remote()) == ta.get(c.getpid.remote())
    with pytest.raises(ValueError):
        ta.get_actor("same", namespace="nowhere")
    ta.kill(a)
    ta.kill(c)


def test_input_checks():
    # Ray: test_actor_failures.py / test_basic.py input checks (ray.kill, ray.get_actor, ray.wait)
    with pytest.raises(ValueError, match="only supported for actor"):
        ta.kill("x")
    with pytest.raises(ValueError):
        ta.get_actor(None)
    with pytest.raises(ValueError):
        ta.get_actor("")
    ref = ta.put(1)
    with pytest.raises(ValueError, match="unique"):
        ta.wait([ref, ref])
    assert ta.wait([]) == ([], [])
    with pytest.raises(TypeError):
        ta.wait([1])
    with pytest.raises(TypeError):
        ta.wait(ref)


# -- test_actor_failures.py -----------------------------------------------------------------

@ta.remote(max_restarts=1)
class Exiter:
    def __init__(self, path=None):
        self.path = path
        if path:
            atexit.register(lambda: open(path, "w").write("atexit ran"))

    def exit(self):
        ta.exit_actor()

    def slow(self):
        time.sleep(0.5)
        return "slow"

    def ping(self):
        return "pong"

    def pid(self):
        return os.getpid()


def test_exit_actor(tmp_path):
    # Ray: test_actor_failures.py::test_exit_actor (atexit handlers: test_actor_advanced.py::test_atexit_handler)
    path = str(tmp_path / "atexit")
    a = Exiter.remote(path)
    pid = ta.get(a.pid.remote())
    first = a.exit.remote()
    queued = a.ping.remote()
    with pytest.raises(ta.ActorDiedError, match="exit_actor()"):
        ta.get(first, timeout=30)
    with pytest.raises(ta.ActorDiedError, match="on purpose"):
        ta.get(queued, timeout=30)
    wait_for_pid_to_exit(pid)
    if BACKEND == "local":      # Ray's kill ends a Ray host: no atexit there (README)
        assert open(path).read() == "atexit ran"
    with pytest.raises(ta.ActorDiedError):      # no restart, though max_restarts=1
        ta.get(a.ping.remote(), timeout=30)


def test_exit_actor_outside_an_actor():
    # Ray: test_actor_failures.py::test_exit_actor_invalid_usage (ray.actor.exit_actor on the driver)
    with pytest.raises(TypeError, match="outside an actor"):
        ta.exit_actor()


def test_kill_with_and_without_restart():
    # Ray: test_actor_failures.py::test_actor_restart (ray.kill(a, no_restart=False)) and test_kill
    a = Exiter.remote()
    pid = ta.get(a.pid.remote())
    ta.kill(a, no_restart=False)
    wait_for_pid_to_exit(pid)
    deadline = time.monotonic() + 30
    while True:
        try:
            assert ta.get(a.pid.remote(), timeout=30) != pid
            break
        except ta.ActorDiedError as e:
            assert e.restarting and time.monotonic() < deadline
            time.sleep(0.1)
    ta.kill(a, no_restart=True)
    with pytest.raises(ta.ActorDiedError) as info:
        ta.get(a.ping.remote(), timeout=30)
    assert info.value.actor_id == a._actor_id


@pytest.mark.slow
@local_only
def test_unlimited_restarts():
    # Ray: test_actor_failures.py::test_actor_restart (max_restarts=-1)
    a = Exiter.options(max_restarts=-1, max_task_retries=-1).remote()
    for _ in range(3):
        pid = ta.get(a.pid.remote(), timeout=60)
        os.kill(pid, signal.SIGKILL)
        wait_for_pid_to_exit(pid)
    assert ta.get(a.ping.remote(), timeout=60) == "pong"
    ta.kill(a)


@ta.remote
class Raiser:
    def value_error(self):
        raise ValueError("bad value on purpose")

    def key_error(self):
        return {}["missing"]


def test_remote_exceptions_keep_their_type():
    # Ray: test_actor_failures.py / test_failure.py (RayTaskError is also the user's exception class)
    r = Raiser.remote()
    with pytest.raises(ValueError, match="bad value on purpose") as info:
        ta.get(r.value_error.remote())
    err = info.value
    assert isinstance(err, ta.ActorError) and err.remote_type == "ValueError"
    assert isinstance(err.__cause__, ta.RemoteTraceback)
    assert "test_ray_semantics.py" in err.remote_traceback and "raise ValueError" in err.remote_traceback
    try:
        ta.get(r.key_error.remote())
    except KeyError as e:
        assert isinstance(e, ta.ActorError)


# -- dependencies (test_actor_advanced.py, Ray's docs on actor task order) ------------------

@ta.remote
class Slow:
    def slow(self, x, seconds=1.0):
        time.sleep(seconds)
        return x

    def fail(self):
        raise ValueError("dependency failed on purpose")

    def add(self, a, b=0):
        return a + b

    def echo(self, x):
        return x


def test_remote_does_not_block_on_a_pending_ref():
    # Ray: test_actor_advanced.py::test_actor_pass_pending_ref (b.f.remote(a.g.remote()) pipelines)
    a, b = Slow.remote(), Slow.remote()
    ta.get([a.ready(), b.ready()], timeout=60)
    t0 = time.monotonic()
    dep = a.slow.remote(20, 1.0)
    out = b.add.remote(dep, b=1)
    assert time.monotonic() - t0 < 0.2
    assert ta.get(out, timeout=30) == 21


def test_a_failed_dependency_fails_the_dependent_call():
    # Ray: test_actor_failures.py::test_actor_dependency_error (the dependency's error comes out)
    a, b = Slow.remote(), Slow.remote()
    failed = a.fail.remote()
    out = b.echo.remote(failed)
    with pytest.raises(ValueError, match="dependency failed on purpose"):
        ta.get(out, timeout=30)
    with pytest.raises(ValueError):
        ta.get(failed)
    out2 = b.echo.remote(failed)            # the dependency is known to have failed by now
    with pytest.raises(ValueError, match="dependency failed on purpose"):
        ta.get(out2, timeout=30)
    assert ta.get(b.echo.remote(3)) == 3


@local_only
def test_order_behind_a_waiting_call():
    # Ray's docs, "Actor task execution order": in a sync actor, one caller's calls run in
    # submission order, so a call behind one whose argument is pending waits for it; in an
    # async actor a later call may run first.
    a = Slow.remote()
    b = Slow.remote()
    ta.get([a.ready(), b.ready()], timeout=60)
    dep = a.slow.remote("dep", 1.0)
    first = b.echo.remote(dep)
    second = b.echo.remote("second")
    ready, _ = ta.wait([first, second], num_returns=1, timeout=30)
    assert ready == [first]
    assert ta.get(second) == "second"

    @ta.remote
    class AsyncEcho:
        async def echo(self, x):
            return x

    c = AsyncEcho.remote()
    ta.get(c.ready(), timeout=60)
    dep = a.slow.remote("dep", 1.0)
    first = c.echo.remote(dep)
    second = c.echo.remote("second")
    ready, _ = ta.wait([first, second], num_returns=1, timeout=30)
    assert ready == [second]
    assert ta.get(first, timeout=30) == "dep"


# -- test_asyncio.py ------------------------------------------------------------------------

def test_asyncio_actor():
    # Ray: test_asyncio.py::test_asyncio_actor
    @ta.remote
    class AsyncBatcher:
        def __init__(self):
            self.batch = []
            self.event = asyncio.Event()

        async def add(self, x):
            self.batch.append(x)
            if len(self.batch) >= 3:
                self.event.set()
            else:
                await self.event.wait()
            return sorted(self.batch)

    a = AsyncBatcher.remote()
    x1, x2, x3 = a.add.remote(1), a.add.remote(2), a.add.remote(3)
    assert ta.get(x1) == ta.get(x2) == ta.get(x3) == [1, 2, 3]


def test_asyncio_actor_same_thread():
    # Ray: test_asyncio.py::test_asyncio_actor_same_thread
    @ta.remote
    class Actor:
        def sync_thread_id(self):
            return threading.current_thread().ident

        async def async_thread_id(self):
            return threading.current_thread().ident

    a = Actor.remote()
    sync_id, async_id = ta.get([a.sync_thread_id.remote(), a.async_thread_id.remote()])
    assert sync_id == async_id


def test_signal_actor_sync_method_wakes_async_waiters():
    # Ray: test_asyncio.py::test_asyncio_double_await (SignalActor from ray._private.test_utils)
    s = SignalActor.remote()
    waiting = [s.wait.remote() for _ in range(3)]
    wait_for_condition(lambda: ta.get(s.cur_num_waiters.remote()) == 3)
    assert ta.wait(waiting, num_returns=1, timeout=0.1)[0] == []
    s.send.remote()
    assert ta.get(waiting, timeout=10) == [None, None, None]


def test_asyncio_actor_concurrency():
    # Ray: test_asyncio.py::test_asyncio_actor_concurrency
    @ta.remote
    class RecordOrder:
        def __init__(self):
            self.history = []

        async def do_work(self):
            self.history.append("STARTED")
            await asyncio.sleep(0)
            self.history.append("ENDED")

        def get_history(self):
            return self.history

    a = RecordOrder.options(max_concurrency=1).remote()
    ta.get([a.do_work.remote() for _ in range(10)])
    assert ta.get(a.get_history.remote()) == ["STARTED", "ENDED"] * 10


def test_max_concurrency_bounds_async_methods():
    # Ray: test_asyncio.py (max_concurrency of async actors; the 50-task case, scaled)
    @ta.remote
    class Sleeper:
        def __init__(self):
            self.running = self.peak = 0

        async def nap(self):
            self.running += 1
            self.peak = max(self.peak, self.running)
            await asyncio.sleep(0.2)
            self.running -= 1

        def peak_seen(self):
            return self.peak

    a = Sleeper.options(max_concurrency=3).remote()
    ta.get(a.ready(), timeout=60)
    t0 = time.monotonic()
    ta.get([a.nap.remote() for _ in range(9)], timeout=30)
    assert time.monotonic() - t0 >= 0.6
    assert ta.get(a.peak_seen.remote()) == 3


def test_asyncio_actor_high_concurrency():
    # Ray: test_asyncio.py::test_asyncio_actor_high_concurrency (scaled from recursionlimit*4)
    @ta.remote
    class AsyncConcurrencyBatcher:
        def __init__(self, batch_size):
            self.batch = []
            self.event = asyncio.Event()
            self.batch_size = batch_size

        async def add(self, x):
            self.batch.append(x)
            if len(self.batch) >= self.batch_size:
                self.event.set()
            else:
                await self.event.wait()
            return sorted(self.batch)

    batch_size = 1500
    actor = AsyncConcurrencyBatcher.options(max_concurrency=batch_size * 2).remote(batch_size)
    result = ta.get([actor.add.remote(i) for i in range(batch_size)], timeout=60)
    assert result[0] == list(range(batch_size)) == result[-1]


def test_asyncio_actor_async_get():
    # Ray: test_asyncio.py::test_asyncio_actor_async_get (await a ref inside an async actor)
    @ta.remote
    class AsyncGetter:
        def __init__(self, other):
            self.other = other

        async def get(self):
            return await self.other.echo.remote(1)

        async def plasma_get(self, plasma_object):
            return await plasma_object[0]

    getter = AsyncGetter.remote(Slow.remote())
    assert ta.get(getter.get.remote(), timeout=60) == 1
    assert ta.get(getter.plasma_get.remote([ta.put(2)])) == 2


def test_asyncio_get_in_the_driver():
    # Ray: test_asyncio.py::test_asyncio_get (await refs, asyncio.gather, errors, a killed actor)
    a = Slow.remote()
    r = Raiser.remote()

    async def main():
        assert await a.echo.remote(2) == 2
        assert await asyncio.gather(*[a.echo.remote(i) for i in range(5)]) == list(range(5))
        ticks = 0
        slow = a.slow.remote("done", 0.5)
        while not ta.wait([slow], timeout=0)[0]:        # the loop keeps running while it waits
            ticks += 1
            await asyncio.sleep(0.01)
        assert await slow == "done" and ticks > 5
        with pytest.raises(ValueError):
            await r.value_error.remote()
        ta.kill(a)
        with pytest.raises(ta.ActorDiedError):
            await a.echo.remote(1)

    asyncio.run(main())


def test_asyncio_exit_actor():
    # Ray: test_asyncio.py::test_asyncio_exit_actor
    @ta.remote
    class Actor:
        async def exit(self):
            ta.exit_actor()

        async def ping(self):
            return "pong"

        async def loop_forever(self):
            while True:
                await asyncio.sleep(5)

    a = Actor.options(max_task_retries=0).remote()
    a.loop_forever.remote()
    with pytest.raises(ta.ActorDiedError):
        ta.get(a.exit.remote(), timeout=30)
    with pytest.raises(ta.ActorDiedError):
        ta.get(a.ping.remote(), timeout=30)


def test_asyncio_actor_with_large_concurrency():
    # Ray: test_asyncio.py::test_asyncio_actor_with_large_concurrency (no thread per slot)
    @ta.remote
    class Actor:
        def sync_thread_id(self):
            return threading.current_thread().ident

        async def async_thread_id(self):
            return threading.current_thread().ident

    a = Actor.options(max_concurrency=100000).remote()
    sync_id, async_id = ta.get([a.sync_thread_id.remote(), a.async_thread_id.remote()], timeout=60)
    assert sync_id == async_id


# -- test_threaded_actor.py -----------------------------------------------------------------

def test_threaded_actor_runs_calls_at_once():
    # Ray: test_threaded_actor.py::test_threaded_actor_basic
    @ta.remote(max_concurrency=10)
    class ThreadedActor:
        def __init__(self):
            self.lock = threading.Lock()
            self.threads = set()

        def work(self):
            with self.lock:
                self.threads.add(threading.current_thread().ident)
            time.sleep(0.3)

        def n_threads(self):
            return len(self.threads)

    a = ThreadedActor.remote()
    ta.get(a.ready(), timeout=60)
    t0 = time.monotonic()
    ta.get([a.work.remote() for _ in range(10)], timeout=30)
    assert time.monotonic() - t0 < 2.5
    assert ta.get(a.n_threads.remote()) > 1


# -- failures in call chains (issue #10) ----------------------------------------------------

@ta.remote
class Creator:
    def make(self):
        self.child = Pid.remote()
        ta.get(self.child.ready(), timeout=60)
        return self.child

    def pid(self):
        return os.getpid()


@local_only
def test_a_call_to_an_actor_whose_creator_died_fails_within_a_second():
    creator = Creator.remote()
    child = ta.get(creator.make.remote(), timeout=60)
    child_pid = ta.get(child.getpid.remote(), timeout=30)
    os.kill(ta.get(creator.pid.remote()), signal.SIGKILL)
    wait_for_pid_to_exit(child_pid)
    t0 = time.monotonic()
    with pytest.raises(ta.ActorDiedError, match="owner"):
        ta.get(child.getpid.remote(), timeout=30)
    assert time.monotonic() - t0 < 1.0


@local_only
def test_a_pending_call_is_retried_when_the_death_is_noticed_after_the_restart():
    a = Exiter.options(max_restarts=1, max_task_retries=1).remote()
    pid = ta.get(a.pid.remote(), timeout=60)
    pending = a.slow.remote()
    time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    wait_for_pid_to_exit(pid)
    time.sleep(3.0)         # the restart has finished before this caller looks
    assert ta.get(pending, timeout=60) == "slow"
    assert ta.get(a.pid.remote(), timeout=30) != pid
    ta.kill(a)


def test_tracebacks_of_a_class_defined_in_a_test_show_its_file_and_lines():
    # issue #10: cloudpickle's <dynamic-code> replaced the file names of classes pickled by value
    @ta.remote
    class Local:
        def fail(self):
            raise RuntimeError("from a local class")

    with pytest.raises(RuntimeError) as info:
        ta.get(Local.remote().fail.remote(), timeout=60)
    tb = info.value.remote_traceback
    assert "test_ray_semantics.py" in tb and 'raise RuntimeError("from a local class")' in tb
    assert "<dynamic-code>" not in tb


def test_rays_spellings_of_errors_and_exit_actor():
    # Ray: ray.exceptions.RayActorError / RayTaskError and ray.actor.exit_actor, as ported code spells them
    assert ta.exceptions.RayActorError is ta.ActorDiedError and ta.exceptions.RayTaskError is ta.ActorError
    assert ta.actor.exit_actor is ta.exit_actor

    @ta.remote
    class Actor:
        async def exit(self):
            ta.actor.exit_actor()

    a = Actor.remote()
    with pytest.raises(ta.exceptions.RayActorError):
        ta.get(a.exit.remote(), timeout=60)


@pytest.mark.parametrize("wait_s", [0.1])
def test_asyncio_double_await(wait_s):
    # Ray: test_asyncio.py::test_asyncio_double_await
    signal_actor = SignalActor.remote()
    waiting = signal_actor.wait.remote()

    async def main():
        future = waiting.as_future()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(future, timeout=wait_s)
        assert future.cancelled()
        await signal_actor.send.remote()
        await waiting
        await waiting

    asyncio.run(main())


@ta.remote(max_restarts=1)
class RestartableActor:
    def __init__(self):
        self.value = 0

    def increase(self, exit=False):
        if exit:
            os._exit(-1)
        self.value += 1
        return self.value


def test_actor_restart():
    # Ray: test_actor_failures.py::test_actor_restart (the end of it: restarts used up, terminate)
    actor = RestartableActor.remote()
    ta.get(actor.ready(), timeout=60)
    actor.increase.remote(exit=True)
    deadline = time.monotonic() + 30
    while True:             # wait for the restart
        try:
            assert ta.get(actor.increase.remote(), timeout=30) == 1
            break
        except ta.ActorDiedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    actor.increase.remote(exit=True)
    for _ in range(20):     # no restarts left: every call fails, and .remote() itself never raises
        ref = actor.increase.remote()
        with pytest.raises(ta.exceptions.RayActorError):
            ta.get(ref, timeout=30)
    actor = RestartableActor.remote()
    actor.__ray_terminate__.remote()
    with pytest.raises(ta.exceptions.RayActorError):
        ta.get(actor.increase.remote(), timeout=30)


def test_random_id_generation():
    # Ray: test_actor.py::test_random_id_generation (ids do not depend on the random seed)
    import random

    random.seed(1234)
    f1 = Pid.remote()
    random.seed(1234)
    f2 = Pid.remote()
    assert f1._actor_id != f2._actor_id and f1._actor_id.hex() != f2._actor_id.hex()
