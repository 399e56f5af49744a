"""Actors forked from the zygote: CUDA-clean and single-threaded at every fork, set up as
their options say, tied to the driver by PDEATHSIG, replaced when the zygote dies; and the
restart back-off that keeps the first restarts fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import process_alive, wait_for

import torchactors as ta
from torchactors.actors import api
from torchactors.jobs.config import parse_config
from torchactors.jobs.runner import run_job
from torchactors.runtime.supervisor import Backoff

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@ta.actor(num_threads=1)
class Probe:
    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def info(self) -> dict:
        return {"pid": os.getpid(), "ppid": os.getppid(), "threads": torch.get_num_threads(),
                "env": dict(os.environ), "tag": self.tag, "sum": float(torch.ones(1000).sum())}


@ta.actor(max_restarts=10)
class Crashy:
    def pid(self) -> int:
        return os.getpid()


def zygote_pid() -> int:
    pid = api.runtime().supervisor.zygote_pid
    assert pid is not None, "no zygote is running"
    return pid


def tasks(pid: int) -> list[str]:
    return os.listdir(f"/proc/{pid}/task")


def cuda_traces(pid: int) -> list[str]:
    """What in ``pid`` shows a CUDA context: open /dev/nvidia* devices or a mapped libcuda."""
    found = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    found = [link for link in found if "nvidia" in link]
    with open(f"/proc/{pid}/maps") as f:
        found += sorted({line.split()[-1] for line in f if "libcuda.so" in line})
    return found


def test_the_zygote_stays_single_threaded_and_cuda_free_while_it_forks_actors():
    ta.init(num_threads=1)
    handles = [Probe.remote(str(i)) for i in range(3)]
    infos = ta.get([h.info.remote() for h in handles], timeout=60)
    zpid = zygote_pid()
    assert {i["ppid"] for i in infos} == {zpid}            # forked from the zygote, not spawned
    assert len(tasks(zpid)) == 1
    assert cuda_traces(zpid) == []
    more = Probe.remote("late")                              # forks after children ran torch ops
    assert ta.get(more.info.remote(), timeout=60)["ppid"] == zpid
    assert len(tasks(zpid)) == 1


SAFETY_PROBE = textwrap.dedent("""
    import os, sys, torch
    from torchactors.runtime import zygote
    zygote.preload()
    print(repr(zygote.fork_safety_problem()))
    torch.set_num_threads(2)
    torch.ones(4_000_000).sum()          # a parallel op starts torch's OpenMP pool
    print(repr(zygote.fork_safety_problem()))
""")


def test_the_fork_safety_check_passes_after_preload_and_catches_a_started_thread_pool():
    env = dict(os.environ, PYTHONPATH=REPO, **{"OPENBLAS_NUM_THREADS": "1"})
    out = subprocess.run([sys.executable, "-c", SAFETY_PROBE], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    clean, dirty = out.stdout.strip().splitlines()
    assert clean == "None"
    assert "threads" in dirty


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_actor_forked_from_the_zygote_gets_its_device_and_the_zygote_stays_cuda_free():
    ta.init(num_threads=1)

    @ta.actor(device="cuda:0")
    class OnGpu:
        def where(self) -> tuple:
            x = torch.ones(4, device="cuda") * 2
            return str(x.device), float(x.sum()), os.getppid()

    h = OnGpu.remote()
    device, total, ppid = ta.get(h.where.remote(), timeout=120)
    assert device == "cuda:0" and total == 8.0
    assert ppid == zygote_pid()
    assert cuda_traces(zygote_pid()) == []


def test_a_forked_actor_gets_its_env_thread_count_and_the_drivers_environment_at_start(monkeypatch):
    ta.init(num_threads=1)
    assert wait_for(lambda: api.runtime().supervisor.zygote_pid, 10)   # started before the variable is set
    monkeypatch.setenv("TA_ZYGOTE_DRIVER_VAR", "set after the zygote started")
    h = Probe.options(num_threads=2, env={"TA_ZYGOTE_ACTOR_VAR": "mine", "CUDA_VISIBLE_DEVICES": ""}).remote()
    info = ta.get(h.info.remote(), timeout=60)
    assert info["ppid"] == zygote_pid()
    assert info["threads"] == 2
    assert info["env"]["TA_ZYGOTE_ACTOR_VAR"] == "mine"
    assert info["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert info["env"]["TA_ZYGOTE_DRIVER_VAR"] == "set after the zygote started"
    assert info["env"]["OMP_NUM_THREADS"] == "2"
    # The zygote's own OPENBLAS_NUM_THREADS=1 is not the actor's: it gets the driver's environment.
    assert info["env"].get("OPENBLAS_NUM_THREADS") == os.environ.get("OPENBLAS_NUM_THREADS")


@ta.actor
class Talker:
    def say(self, text: str) -> None:
        print(text, flush=True)
        print(text, file=sys.stderr, flush=True)


def test_a_forked_actor_writes_to_the_drivers_stdout_and_stderr_as_they_are_now(tmp_path):
    ta.init()
    api.runtime().supervisor.prestart()         # the zygote starts with this process's fds 1 and 2
    time.sleep(0.5)
    out_file, err_file = tmp_path / "out", tmp_path / "err"
    saved = os.dup(1), os.dup(2)
    try:
        with open(out_file, "wb") as out, open(err_file, "wb") as err:
            os.dup2(out.fileno(), 1)            # then they are redirected, as a notebook or a
            os.dup2(err.fileno(), 2)            # test runner does; a spawned actor would follow
            h = Talker.remote()
            ta.get(h.say.remote("hello from a forked actor"), timeout=30)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
    assert "hello from a forked actor" in out_file.read_text()
    assert "hello from a forked actor" in err_file.read_text()


def test_forked_actors_do_not_share_the_zygotes_random_state():
    ta.init(num_threads=1)

    @ta.actor(num_threads=1)
    class Dice:
        def roll(self) -> tuple:
            import random

            import numpy
            return random.random(), float(numpy.random.rand())

    rolls = ta.get([Dice.remote().roll.remote() for _ in range(3)], timeout=60)
    assert len({r[0] for r in rolls}) == 3 and len({r[1] for r in rolls}) == 3, rolls


DRIVER = textwrap.dedent("""
    import json, os, sys, time, torch
    import torchactors as ta

    @ta.actor(num_threads=1)
    class Holder:
        def __init__(self):
            self.ref = ta.put(torch.ones(1 << 18))       # a store segment: a memfd in this actor
        def pid(self):
            return os.getpid()

    ta.init(num_threads=1)
    keep = ta.put(torch.zeros(1 << 18))                  # and one in the driver
    hs = [Holder.remote() for _ in range(2)]
    pids = ta.get([h.pid.remote() for h in hs], timeout=60)
    from torchactors.actors import api
    print(json.dumps({"driver": os.getpid(), "zygote": api.runtime().supervisor.zygote_pid, "actors": pids}),
          flush=True)
    time.sleep(600)
""")


def torchactors_memfds_of(pids: set[int]) -> list[str]:
    """Every fd in any process of the machine that is a torchactors memfd made by one of ``pids``."""
    marks = [f"memfd:torchactors-{pid}-" for pid in pids] + [f"memfd:torchactors-table-{pid} " for pid in pids]
    found = []
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            names = os.listdir(f"/proc/{proc}/fd")
        except OSError:
            continue
        for fd in names:
            try:
                link = os.readlink(f"/proc/{proc}/fd/{fd}")
            except OSError:
                continue
            if any(m in link for m in marks):
                found.append(f"{proc}: {link}")
    return found


def test_sigkill_of_the_driver_takes_the_zygote_and_its_actors_within_2s_leaving_no_memfd(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=REPO))
    try:
        line = driver.stdout.readline()
        assert line, "the driver printed nothing"
        pids = json.loads(line)
        everyone = {pids["driver"], pids["zygote"], *pids["actors"]}
        assert torchactors_memfds_of(everyone)               # the probe sees them while they live
        driver.kill()
        t0 = time.monotonic()
        driver.wait(10)
        gone = wait_for(lambda: not any(process_alive(p) for p in everyone), 2.0, interval=0.01)
        took = time.monotonic() - t0
        assert gone, f"still alive {took:.2f}s after SIGKILL: {[p for p in everyone if process_alive(p)]}"
        assert took < 2.0
        assert torchactors_memfds_of(everyone) == []
    finally:
        driver.kill()
        driver.wait(10)
        driver.stdout.close()


def test_a_killed_zygote_takes_its_actors_and_the_next_start_makes_a_new_one():
    ta.init(num_threads=1)
    h = Crashy.remote()
    first = ta.get(h.pid.remote(), timeout=60)
    old = zygote_pid()
    assert torchactors_memfds_of({first})                   # its store, while it lives
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: not process_alive(first), 2.0), "the actor outlived its zygote"
    assert torchactors_memfds_of({first, old}) == []
    with pytest.raises(ta.ActorDiedError) as info:
        ta.get(h.pid.remote(), timeout=60)
    assert info.value.signal_name == "SIGKILL"
    # Restarted by a new zygote; and new actors start from it.
    assert wait_for(lambda: api.runtime().supervisor.zygote_pid not in (None, old), 30)
    assert next_incarnation_pid(h, first, 60) != first
    fresh = ta.get(Probe.remote().info.remote(), timeout=60)
    assert fresh["ppid"] == zygote_pid() != old


def test_spawn_start_method_per_actor_and_per_init():
    ta.init(num_threads=1)
    spawned = ta.get(Probe.options(start_method="spawn").remote().info.remote(), timeout=120)
    forked = ta.get(Probe.remote().info.remote(), timeout=60)
    assert spawned["ppid"] == os.getpid()
    assert forked["ppid"] == zygote_pid()
    ta.shutdown()
    ta.init(num_threads=1, start_method="spawn")
    assert ta.get(Probe.remote().info.remote(), timeout=120)["ppid"] == os.getpid()
    assert api.runtime().supervisor.zygote_pid is None        # a spawn job starts no zygote


JOB_MODULE = textwrap.dedent("""
    import json, os

    class Who:
        def ppid(self):
            return os.getppid()

    def main(job):
        import torchactors as ta
        out = {role: ta.get([h.ppid.remote() for h in hs]) for role, hs in job.roles.items()}
        out["driver"] = os.getpid()
        (job.out_dir / "ppids.json").write_text(json.dumps(out))
""")


def test_start_method_spawn_in_a_job_file_and_zygote_for_one_role(tmp_path, monkeypatch):
    (tmp_path / "zygjobmod.py").write_text(JOB_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    config = parse_config(textwrap.dedent("""
        job: {name: zyg}
        runtime: {num_threads: 1, start_method: spawn}
        roles:
          plain: {class: zygjobmod:Who}
          quick: {class: zygjobmod:Who, start_method: zygote}
        program: zygjobmod:main
    """))
    with open(os.devnull, "w") as quiet:
        run_job(config, tmp_path / "out", stream=quiet)
    ppids = json.loads((tmp_path / "out" / "ppids.json").read_text())
    assert ppids["plain"] == [ppids["driver"]]
    assert ppids["quick"] != [ppids["driver"]]


def next_incarnation_pid(h, old: int, timeout: float) -> int:
    """Call ``h.pid`` until a process other than ``old`` answers (through its restart)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid = ta.get(h.pid.remote(), timeout=timeout)
            if pid != old:
                return pid
        except ta.ActorDiedError as e:
            assert e.restarting and time.monotonic() < deadline, e
        time.sleep(0.002)


def kill_and_time_next_call(h) -> float:
    """SIGKILL the actor; seconds until a call succeeds on its next incarnation."""
    pid = ta.get(h.pid.remote(), timeout=60)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    next_incarnation_pid(h, pid, 30)
    return time.monotonic() - t0


def test_the_first_three_restarts_are_back_within_a_second_then_the_back_off_starts():
    ta.init(num_threads=1)
    h = Crashy.options(restart_backoff={"initial": 0.4, "max": 0.8}).remote()
    fast = [kill_and_time_next_call(h) for _ in range(3)]
    assert max(fast) < 1.0, fast
    slow = [kill_and_time_next_call(h) for _ in range(2)]
    assert slow[0] >= 0.4 and slow[1] >= 0.8, slow        # a crash loop still backs off, doubling


def test_restart_backoff_with_no_fast_restarts_waits_from_the_first():
    ta.init(num_threads=1)
    h = Crashy.options(restart_backoff={"fast": 0, "initial": 0.5}).remote()
    assert kill_and_time_next_call(h) >= 0.5


@pytest.mark.parametrize("value,words", [
    ({"fast": -1}, "fast must be an int >= 0"),
    ({"initial": "soon"}, "initial must be a number"),
    ({"max": 1.0, "initial": 2.0}, "must be >= initial"),
    ({"slow": 1}, "unknown restart_backoff key"),
    ([1, 2], "must be a dict"),
])
def test_bad_restart_backoff_is_refused_naming_the_problem(value, words):
    with pytest.raises(ValueError, match=words):
        Crashy.options(restart_backoff=value)


def test_backoff_defaults_are_documented_values():
    assert Backoff.parse(None) == Backoff(fast=3, initial=0.2, max=10.0, reset_after=30.0)
    assert Backoff.parse({"fast": 1}) == Backoff(fast=1)


def test_an_unknown_start_method_is_refused():
    with pytest.raises(ValueError, match="zygote, spawn"):
        Probe.options(start_method="fork")
    with pytest.raises(ValueError, match="zygote, spawn"):
        ta.init(start_method="forkserver")


UNSAFE_SITE = textwrap.dedent("""
    import os, threading, time
    if os.environ.get("TA_TEST_THREAD_AT_STARTUP"):
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
""")


def test_a_zygote_that_is_unsafe_to_fork_is_dropped_and_actors_are_spawned(tmp_path, monkeypatch, caplog):
    (tmp_path / "sitecustomize.py").write_text(UNSAFE_SITE)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("TA_TEST_THREAD_AT_STARTUP", "1")
    ta.init(num_threads=1)
    info = ta.get(Probe.remote().info.remote(), timeout=120)
    assert info["ppid"] == os.getpid()
    assert "cannot fork safely" in caplog.text and "2 Python threads" in caplog.text
    assert api.runtime().supervisor.zygote_pid is None


def test_a_job_file_with_a_bad_restart_backoff_names_the_role_key_and_problem(tmp_path, monkeypatch):
    (tmp_path / "zygjobmod.py").write_text(JOB_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ta.ConfigError) as info:
        parse_config(textwrap.dedent("""
            job: {name: zyg}
            roles:
              w: {class: zygjobmod:Who, restart_backoff: {fast: -1}}
            program: zygjobmod:main
        """), file="job.yaml")
    text = str(info.value)
    assert "job.yaml:4" in text and "roles.w.restart_backoff" in text and "fast must be an int >= 0" in text
