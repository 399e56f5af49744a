"""Actors across real processes: calls, ordering, errors, deaths, restarts, transport security."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import threading
import time

import pytest
import torch

import torchactors as ta
from torchactors.actors import api
from torchactors.runtime.transport import AUTH_TIMEOUT, AuthenticationError, connect


@ta.actor(num_threads=1)
class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start
        self.log: list[int] = []

    def record(self, i: int) -> None:
        self.log.append(i)

    def history(self) -> list:
        return self.log

    def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value

    def pid(self) -> int:
        return os.getpid()

    def threads(self) -> int:
        return torch.get_num_threads()

    def fail(self, message: str) -> None:
        raise KeyError(message)

    def sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    def fill(self, t: torch.Tensor, value: float) -> float:
        t.fill_(value)
        return float(t.sum())

    def kinds(self, top, nested) -> tuple:
        return type(top).__name__, type(nested["ref"]).__name__

    def make(self, n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.float32)

    def call_other(self, other: ta.ActorHandle, by: int) -> int:
        return ta.get(other.incr.remote(by))

    def spawn_child(self) -> int:
        child = Counter.remote(100)
        value = ta.get(child.incr.remote(5))
        ta.kill(child)
        return value


@ta.actor(max_concurrency=4)
class Pool:
    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


@ta.actor
class Async:
    async def later(self, x: int) -> int:
        await asyncio.sleep(0.05)
        return x * 2


@ta.actor(max_restarts=1)
class Phoenix:
    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.started = time.time()

    def info(self) -> tuple:
        return self.tag, os.getpid()


@ta.actor(max_restarts=2, max_task_retries=1)
class Flaky:
    """Dies in the middle of a call while the marker file is absent (and creates it)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def work(self, x: int, die: bool = True) -> tuple:
        if die and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(3)
        return x * 2, os.getpid()

    def nap(self, seconds: float) -> None:
        time.sleep(seconds)

    def crash(self, log: str) -> None:
        with open(log, "a") as f:
            f.write("ran\n")
        os._exit(4)


@ta.actor
class BadInit:
    def __init__(self) -> None:
        raise RuntimeError("no GPU here")

    def ping(self) -> None:
        return None


@pytest.fixture(scope="module")
def counter():
    ta.init(num_threads=1)
    h = Counter.remote(0)
    yield h
    ta.kill(h)


def test_call_returns_ref_at_once_and_get_gives_value(counter):
    ref = counter.incr.remote(2)
    assert isinstance(ref, ta.ObjectRef)
    assert ta.get(ref) >= 2


def test_calls_from_one_caller_run_in_submission_order(counter):
    refs = [counter.record.remote(i) for i in range(1000)]
    ta.get(refs[-1])
    log = ta.get(counter.history.remote())
    assert log[-1000:] == list(range(1000))


def test_exception_reaches_caller_with_type_message_traceback_and_actor_keeps_serving(counter):
    with pytest.raises(ta.ActorError) as info:
        ta.get(counter.fail.remote("missing-key-42"))
    err = info.value
    assert err.remote_type == "KeyError"
    assert "missing-key-42" in str(err)
    assert "Traceback" in err.remote_traceback and "in fail" in err.remote_traceback
    assert ta.get(counter.incr.remote(0)) >= 0


class PairError(Exception):
    """Its own pickling does not rebuild it (pickle calls PairError(message)): the cause must
    travel by its state."""

    def __init__(self, code: int, where: str) -> None:
        super().__init__(f"code {code} at {where}")
        self.code = code
        self.where = where


@ta.actor(num_threads=1)
class Raises:
    def pair_error(self) -> None:
        raise PairError(7, "step")

    def raise_(self, exc: BaseException) -> None:
        raise exc

    def relay(self, other: ta.ActorHandle) -> None:
        ta.get(other.pair_error.remote())


def test_remote_exception_is_the_cause_with_its_attributes_even_when_its_pickling_is_broken():
    with pytest.raises(PairError) as info:
        ta.get(Raises.remote().pair_error.remote())
    err = info.value
    assert isinstance(err, ta.ActorError)
    assert type(err.cause) is PairError and (err.cause.code, err.cause.where) == (7, "step")
    assert (err.code, err.where) == (7, "step")     # the dual error's missing attributes are the cause's
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, PairError) and again.code == 7 and str(again) == str(err)


def test_an_error_class_defined_in_a_function_is_caught_by_its_class():
    class LocalError(Exception):
        pass

    with pytest.raises(LocalError) as info:
        ta.get(Raises.remote().raise_.remote(LocalError("from a test function")))
    assert type(info.value.cause) is LocalError and str(info.value.cause) == "from a test function"


def test_an_exception_that_cannot_be_pickled_has_no_cause_but_keeps_its_text():
    class Unpicklable(Exception):
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.lock = threading.Lock()     # neither the exception nor its state pickles

    @ta.actor(num_threads=1)
    class Thrower:
        def boom(self) -> None:
            raise Unpicklable("the message")

    with pytest.raises(ta.ActorError) as info:
        ta.get(Thrower.remote().boom.remote())
    assert info.value.cause is None
    assert info.value.remote_type.endswith("Unpicklable") and "the message" in str(info.value)


def test_an_error_a_method_lets_through_keeps_the_first_remote_class_and_cause():
    with pytest.raises(PairError) as info:
        ta.get(Raises.remote().relay.remote(Raises.remote()))
    err = info.value
    assert err.remote_type == "PairError" and err.remote_message == "code 7 at step"
    assert err.code == 7 and "in relay" in err.remote_traceback


def test_get_timeout_raises_get_timeout_error(counter):
    ref = counter.sleep.remote(1.0)
    t0 = time.monotonic()
    with pytest.raises(ta.GetTimeoutError):
        ta.get(ref, timeout=0.1)
    assert time.monotonic() - t0 < 0.9
    assert ta.get(ref) == "slept"


def test_wait_returns_ready_refs_in_input_order(counter):
    slow = counter.sleep.remote(0.5)
    fast = counter.incr.remote(0)
    ready, rest = ta.wait([slow, fast], num_returns=2, timeout=5)
    assert ready == [slow, fast] and rest == []
    ready, rest = ta.wait([counter.sleep.remote(0.3)], num_returns=1, timeout=0.01)
    assert ready == [] and len(rest) == 1


def test_actor_gets_configured_thread_count(counter):
    assert ta.get(counter.threads.remote()) == 1


def test_tensor_argument_arrives_as_view_of_callers_memory(counter):
    t = torch.zeros(1000)
    assert ta.get(counter.fill.remote(t, 3.0)) == 3000.0
    # The actor wrote into the object (the caller's shared copy), not into `t`: put is a snapshot.
    assert float(t.sum()) == 0.0


def test_top_level_refs_are_resolved_nested_refs_stay_refs(counter):
    ref = ta.put(torch.ones(3))
    assert ta.get(counter.kinds.remote(ref, {"ref": ref})) == ("Tensor", "ObjectRef")


def test_tensor_result_is_mapped_not_copied(counter):
    ref = counter.make.remote(1 << 16)
    out = ta.get(ref)
    assert torch.equal(out, torch.arange(1 << 16, dtype=torch.float32))
    again = ta.get(ref)
    assert out.data_ptr() == again.data_ptr() or out.untyped_storage().nbytes() == again.untyped_storage().nbytes()


def test_unpicklable_argument_raises_at_call_site_naming_it(counter):
    with pytest.raises(TypeError, match="argument 1"):
        counter.kinds.remote(1, threading.Lock())


def test_unknown_method_names_the_methods_it_has(counter):
    with pytest.raises(AttributeError, match="incr"):
        _ = counter.nope


@ta.actor(num_threads=1)
class Shapes:
    def plain(self, a, b=2, *, c, d=4):
        return a, b, c, d

    def star(self, *args, **kwargs):
        return args, kwargs

    @staticmethod
    def static(x):
        return x

    @classmethod
    def klass(cls, x):
        return x

    def call(self, other: ta.ActorHandle, *args):
        return ta.get(other.plain.remote(*args))


def test_method_arguments_are_checked_at_remote_against_the_signature():
    h = Shapes.remote()
    assert ta.get(h.plain.remote(1, c=3)) == (1, 2, 3, 4)
    assert ta.get(h.star.remote(1, 2, k=3)) == ((1, 2), {"k": 3})
    assert ta.get([h.static.remote(5), h.klass.remote(6)]) == [5, 6]
    for bad in (lambda: h.plain.remote(1), lambda: h.plain.remote(1, 2, 3, c=3), lambda: h.plain.remote(c=3),
                lambda: h.plain.remote(1, c=3, e=5), lambda: h.static.remote(), lambda: h.klass.remote(1, 2)):
        with pytest.raises(TypeError, match=r"\.remote\(\): .*the arguments do not match"):
            bad()
    with pytest.raises(TypeError, match="missing a required argument: 'c'"):
        ta.get(h.call.remote(h, 1), timeout=60)        # the handle checks in the actor it was passed to
    again = pickle.loads(pickle.dumps(h))
    with pytest.raises(TypeError):
        again.plain.remote()


def test_dir_of_a_handle_lists_the_actors_methods(counter):
    assert {"incr", "record", "fail"} <= set(dir(counter))
    assert [n for n in dir(counter.incr) if not n.startswith("_")] == ["options", "remote"]


def test_handles_pass_between_actors(counter):
    other = Counter.remote(10)
    try:
        assert ta.get(counter.call_other.remote(other, 5)) == 15
    finally:
        ta.kill(other)


def test_api_works_inside_actors(counter):
    assert ta.get(counter.spawn_child.remote()) == 105


def test_class_defined_in_a_test_function():
    @ta.actor
    class Local:
        def __init__(self, k):
            self.k = k

        def times(self, x):
            return self.k * x

    h = Local.remote(3)
    try:
        assert ta.get(h.times.remote(7)) == 21
    finally:
        ta.kill(h)


def test_max_concurrency_runs_calls_in_parallel():
    h = Pool.remote()
    try:
        ta.get(h.sleep.remote(0.0))
        t0 = time.monotonic()
        assert ta.get([h.sleep.remote(0.5) for _ in range(4)]) == [0.5] * 4
        assert time.monotonic() - t0 < 1.5
    finally:
        ta.kill(h)


def test_async_methods_run_on_event_loop():
    h = Async.remote()
    try:
        assert ta.get([h.later.remote(i) for i in range(5)]) == [0, 2, 4, 6, 8]
    finally:
        ta.kill(h)


def test_sigkill_mid_call_fails_pending_call_within_a_second(counter):
    h = Counter.remote(0)
    pid = ta.get(h.pid.remote())
    ref = h.sleep.remote(30)
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ta.ActorDiedError) as info:
        ta.get(ref, timeout=10)
    assert time.monotonic() - t0 < 1.0
    assert info.value.signal_name == "SIGKILL"
    with pytest.raises(ta.ActorDiedError):
        ta.get(h.incr.remote(1), timeout=10)


def test_restart_reruns_constructor_with_same_arguments():
    h = Phoenix.remote("tag-7")
    tag, pid = ta.get(h.info.remote())
    assert tag == "tag-7"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            tag2, pid2 = ta.get(h.info.remote(), timeout=30)
            break
        except ta.ActorDiedError as e:
            assert e.restarts_left >= 0
            assert time.monotonic() < deadline, "actor was not restarted"
            time.sleep(0.1)
    assert tag2 == "tag-7" and pid2 != pid
    ta.kill(h)


def _status_when(handle: ta.ActorHandle, ready, timeout: float = 30.0) -> ta.ActorStatus:
    """The actor's status once ``ready(status)`` holds (fails after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        status = ta.actor_status(handle)
        if status is not None and ready(status):
            return status
        assert time.monotonic() < deadline, f"status never got there; last: {status}"
        time.sleep(0.02)


def test_actor_status_counts_a_restart_after_sigkill():
    h = Phoenix.remote("counted")
    _, pid = ta.get(h.info.remote(), timeout=30)
    first = ta.actor_status(h)
    assert isinstance(first, ta.ActorStatus)
    assert (first.state, first.incarnation, first.pid, first.restarts, first.restarts_left) == ("alive", 0, pid, 0, 1)
    os.kill(pid, signal.SIGKILL)
    again = _status_when(h, lambda s: s.state == "alive" and s.incarnation == 1)
    assert again.restarts == 1 and again.restarts_left == 0 and again.pid not in (None, pid)
    assert again.signal == "SIGKILL" and again.exit_code is None      # how the last process ended
    assert again.owner == os.getpid() and not again.killed
    ta.kill(h)
    gone = _status_when(h, lambda s: s.state == "dead")
    assert gone.killed and gone.restarts == 1


def test_actor_status_rejects_what_is_not_a_handle():
    with pytest.raises(TypeError, match="actor handle"):
        ta.actor_status("counter")


def test_a_call_pending_when_its_actor_dies_is_retried_on_the_restarted_actor(tmp_path):
    h = Flaky.remote(str(tmp_path / "died-once"))
    try:
        _, first_pid = ta.get(h.work.remote(0, die=False), timeout=60)
        doomed = h.work.remote(21)              # kills incarnation 0 mid-call
        later = h.work.remote(5, die=False)     # sent before the death: retried after it, in order
        assert ta.get(doomed, timeout=60)[0] == 42
        value, pid = ta.get(later, timeout=60)
        assert value == 10 and pid != first_pid
        assert ta.get(h.work.remote(1, die=False), timeout=60)[0] == 2     # calls go on as usual
    finally:
        ta.kill(h)


def test_retries_are_bounded_and_then_the_death_is_reported(tmp_path):
    h = Flaky.remote(str(tmp_path / "m"))
    log = tmp_path / "crash.log"
    try:
        with pytest.raises(ta.ActorDiedError, match="exited with code 4"):
            ta.get(h.crash.remote(str(log)), timeout=60)   # the first try and one retry, each fatal
        assert log.read_text() == "ran\n" * 2
        assert ta.get(h.work.remote(3, die=False), timeout=60)[0] == 6    # restarted (its last restart)
    finally:
        ta.kill(h)


def test_killing_an_actor_with_retries_fails_its_pending_calls_without_retrying(tmp_path):
    h = Flaky.remote(str(tmp_path / "m"))
    ta.get(h.work.remote(0, die=False), timeout=60)
    pending = h.nap.remote(30)
    time.sleep(0.2)
    t0 = time.monotonic()
    ta.kill(h)
    with pytest.raises(ta.ActorDiedError, match="killed"):
        ta.get(pending, timeout=20)
    assert time.monotonic() - t0 < 5


def test_calls_made_while_a_retrying_actor_restarts_wait_for_it(tmp_path):
    h = Flaky.remote(str(tmp_path / "m"))
    try:
        _, pid = ta.get(h.work.remote(0, die=False), timeout=60)
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)                         # the supervisor has seen it: "restarting"
        assert ta.get(h.work.remote(4, die=False), timeout=60)[0] == 8
    finally:
        ta.kill(h)


def test_a_handle_carries_max_task_retries_to_other_processes():
    h = Flaky.options(max_task_retries=3).remote("/tmp/unused")
    try:
        assert pickle.loads(pickle.dumps(h))._max_task_retries == 3
        named = Flaky.options(name="flaky-named").remote("/tmp/unused")
        assert ta.get_actor("flaky-named")._max_task_retries == 1
        ta.kill(named)
    finally:
        ta.kill(h)


def test_failing_constructor_reports_its_traceback():
    h = BadInit.remote()
    with pytest.raises(ta.ActorDiedError, match="no GPU here"):
        ta.get(h.ping.remote(), timeout=60)


def test_kill_fails_later_calls():
    h = Counter.remote(0)
    assert ta.get(h.incr.remote()) == 1
    ta.kill(h)
    with pytest.raises(ta.ActorDiedError, match="killed"):
        ta.get(h.incr.remote(), timeout=10)


def test_named_actor_lookup(counter):
    h = Counter.options(name="the-counter").remote(40)
    try:
        same = ta.get_actor("the-counter")
        assert ta.get(same.incr.remote(2)) == 42
        with pytest.raises(ValueError, match="already exists"):
            Counter.options(name="the-counter").remote(0)
    finally:
        ta.kill(h)
    with pytest.raises(ValueError, match="no actor named"):
        ta.get_actor("the-counter")


def test_unauthenticated_connection_is_refused_and_actor_keeps_serving(counter):
    ta.get(counter.incr.remote(0))
    job = api.runtime().job
    path = job.socket_path(counter._actor_id, 0)
    assert oct(os.stat(job.dir).st_mode & 0o777) == "0o700"
    with pytest.raises((AuthenticationError, ConnectionError, OSError)):
        connect(path, b"not-the-secret" * 2, timeout=5)
    # A raw client that sends a pickle without authenticating is closed unread.
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.recv(32)
    s.sendall(b"\x80\x04" + b"x" * 62)
    s.settimeout(5)
    assert s.recv(100) == b""
    s.close()
    assert ta.get(counter.incr.remote(0)) >= 0


def _silent_client(path: str) -> socket.socket:
    """A client that connects, reads the actor's nonce, and never answers."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    assert len(s.recv(32)) == 32
    return s


def test_a_client_silent_mid_handshake_stalls_no_other_caller(counter):
    before = ta.get(counter.incr.remote(0))
    job = api.runtime().job
    path = job.socket_path(counter._actor_id, 0)
    silent = _silent_client(path)
    try:
        t0 = time.monotonic()
        assert ta.get(counter.incr.remote(1), timeout=5) == before + 1     # an existing caller
        connect(path, job.secret, timeout=5).close()                          # a new caller
        assert time.monotonic() - t0 < 3
    finally:
        silent.close()


@pytest.mark.slow
def test_a_client_silent_mid_handshake_is_dropped_after_the_auth_timeout(counter):
    ta.get(counter.incr.remote(0))
    silent = _silent_client(api.runtime().job.socket_path(counter._actor_id, 0))
    silent.settimeout(AUTH_TIMEOUT + 5)
    t0 = time.monotonic()
    assert silent.recv(100) == b""
    assert AUTH_TIMEOUT - 0.5 < time.monotonic() - t0 < AUTH_TIMEOUT + 3
    silent.close()


def test_bad_options_are_refused():
    with pytest.raises(TypeError, match="allowed"):
        Counter.options(gpus=1)
    with pytest.raises(ValueError, match="max_task_retries"):
        Counter.options(max_task_retries=-2)
    with pytest.raises(ValueError, match="ray_options must be a dict"):
        Counter.options(ray_options=["resources"])
    for device in ("tpu", "cuda:", "cuda:x", "cuda0"):
        with pytest.raises(ValueError, match="device must be"):
            Counter.options(device=device)
    with pytest.raises(TypeError, match=r"\.remote"):
        Counter(1)


def test_first_call_to_a_starting_actor_returns_at_once():
    t0 = time.monotonic()
    h = Counter.remote(5)
    ref = h.incr.remote(1)          # the process is still importing torch
    assert time.monotonic() - t0 < 0.5
    assert ta.get(ref, timeout=60) == 6
    ta.kill(h)


def test_wait_with_zero_timeout_sees_results_that_arrived(counter):
    ta.get(counter.incr.remote(0), timeout=60)     # the actor is up
    ref = counter.incr.remote(0)
    time.sleep(0.3)
    ready, rest = ta.wait([ref], num_returns=1, timeout=0)
    assert ready == [ref] and rest == []


def test_calls_while_restarting_say_so():
    h = Phoenix.remote("x")
    _, pid = ta.get(h.info.remote(), timeout=60)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ta.ActorDiedError) as info:
        ta.get(h.info.remote(), timeout=10)
    if info.value.restarting:       # (it may already be back up on a fast machine)
        assert "being restarted" in str(info.value)
    ta.kill(h)


def test_threads_of_one_caller_share_an_actor_without_mixing_results(counter):
    errors: list = []

    def worker(k: int) -> None:
        try:
            refs = [counter.fill.remote(torch.zeros(10), float(k)) for _ in range(100)]
            assert ta.get(refs, timeout=60) == [10.0 * k] * 100
            for _ in range(50):
                ready, _ = ta.wait([counter.incr.remote(0)], num_returns=1, timeout=60)
                assert len(ready) == 1
        except Exception as e:     # reported below, with the thread's number
            errors.append((k, repr(e)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a caller thread hung"
    assert errors == []
    # ~2 s normally; a wait() that missed a reply another thread read would sit out its timeout.
    assert time.monotonic() - t0 < 30


def test_ray_shutdown_runs_when_last_handle_goes_before_any_call(counter, tmp_path):
    # Ray calls __ray_shutdown__ when an actor goes out of scope, called or not: the local
    # backend must stop it (not kill it) even though this process never connected to it.
    path = tmp_path / "shutdown"

    @ta.remote
    class Closer:
        def __init__(self, path: str) -> None:
            self.path = path

        def __ray_shutdown__(self) -> None:
            with open(self.path, "w") as f:
                f.write("closed")

    h = Closer.remote(str(path))
    del h
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text() == "closed"):
        assert time.monotonic() < deadline, "__ray_shutdown__ did not run after the last handle went"
        time.sleep(0.05)
