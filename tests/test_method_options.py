"""Per-method options: ``@ta.method`` retries of a method that raised, and Ray's
``__ray_invocation_decorator__`` (tests/test_ray_ported.py has Ray's own ports of both)."""

from __future__ import annotations

import os

import pytest

import torchactors as ta

BACKEND = os.environ.get("TORCHACTORS_BACKEND", "local")


class Flaky(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def runtime():
    ta.init(backend=BACKEND)
    yield


@ta.remote
class Retrying:
    def __init__(self):
        self.runs = 0

    @ta.method(max_task_retries=2, retry_exceptions=True)
    def fails_twice(self):
        self.runs += 1
        if self.runs <= 2:
            raise Flaky(f"run {self.runs}")
        return self.runs

    @ta.method(max_retries=5, retry_exceptions=[Flaky])
    def wrong_error(self):
        self.runs += 1
        raise KeyError("not retried")

    @ta.method(max_task_retries=1, retry_exceptions=[Flaky])
    async def fails_always(self):
        self.runs += 1
        raise Flaky(f"run {self.runs}")

    def count(self):
        return self.runs


def test_retried_until_it_returns():
    a = Retrying.remote()
    assert ta.get(a.fails_twice.remote(), timeout=60) == 3


def test_other_exceptions_are_not_retried():
    a = Retrying.remote()
    with pytest.raises(KeyError):
        ta.get(a.wrong_error.remote(), timeout=60)
    assert ta.get(a.count.remote(), timeout=60) == 1


def test_async_method_gives_up_after_its_retries():
    a = Retrying.remote()
    with pytest.raises(Flaky, match="run 2"):
        ta.get(a.fails_always.remote(), timeout=60)
    assert ta.get(a.count.remote(), timeout=60) == 2


def test_options_of_a_call_override_the_method():
    a = Retrying.remote()
    with pytest.raises(Flaky, match="run 1"):
        ta.get(a.fails_twice.options(retry_exceptions=False).remote(), timeout=60)
    b = Retrying.remote()
    with pytest.raises(KeyError):
        ta.get(b.wrong_error.options(max_task_retries=2, retry_exceptions=[KeyError]).remote(), timeout=60)
    assert ta.get(b.count.remote(), timeout=60) == 3        # the first run and two retries
    c = Retrying.remote()
    assert ta.get(c.fails_twice.options(max_retries=-1, retry_exceptions=True).remote(), timeout=60) == 3


@pytest.mark.parametrize("options, error", [
    ({"retry_exceptions": [Flaky]}, ValueError),                 # how many times?
    ({"max_task_retries": 3}, ValueError),                       # retries of what?
    ({"max_task_retries": -2, "retry_exceptions": True}, ValueError),
    ({"max_task_retries": 1, "retry_exceptions": ["Flaky"]}, TypeError),
    ({"max_task_retries": 1, "max_retries": 1, "retry_exceptions": True}, TypeError),
])
def test_bad_retry_options_are_refused(options, error):
    with pytest.raises(error):
        ta.method(**options)


def test_invocation_decorator_survives_passing_the_handle():
    def invocation(f):
        def invoke(args, kwargs):
            return "wrapped", f(args, kwargs)
        return invoke

    def execution(f):
        f.__ray_invocation_decorator__ = invocation
        return f

    @ta.remote
    class Target:
        @execution
        def echo(self, x):
            return x

    @ta.remote
    class Caller:
        def call(self, target):
            tag, ref = target.echo.remote(5)
            return tag, ta.get(ref, timeout=60)

    t = Target.remote()
    assert ta.get(Caller.remote().call.remote(t), timeout=60) == ("wrapped", 5)
