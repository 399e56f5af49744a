"""The `torchactors` command and the job runner: exit codes, outputs, and clean stops with real processes.

Tests marked "needs the runtime" start real actor processes through `torchactors run`; the
others (validate, plot, the job context) need only the config layer.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from torchactors.jobs import cli
from torchactors.jobs.config import parse_config
from torchactors.jobs.context import JobContext
from torchactors.jobs.progress import METRICS_COLUMNS
from torchactors.jobs.summary import STOP_REASONS

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB = REPO / "configs" / "impala_cartpole.yaml"

JOBMOD = textwrap.dedent('''
    """Actors and programs for the CLI tests (written to a temporary directory)."""
    import json
    import os
    import time

    import torch


    class Counter:
        def __init__(self, step=1, replica_index=None, seed=None):
            self.step = step
            self.index = replica_index
            self.seed = seed
            self.total = 0

        def add(self, n):
            self.total += n * self.step
            return self.total

        def whoami(self):
            return {"index": self.index, "seed": self.seed, "pid": os.getpid(), "flag": os.environ.get("CLI_TEST_FLAG")}


    def _started(job):
        import torchactors as ta
        handles = [h for hs in job.roles.values() for h in hs]
        who = ta.get([h.whoami.remote() for h in handles])
        for w, h in zip(who, handles):
            w["retries"] = h._max_task_retries
        (job.out_dir / "started.json").write_text(json.dumps(who))


    def count(job, per_counter=50):
        """Report per_counter frames per counter per round until told to stop."""
        import torchactors as ta
        _started(job)
        counters = job.roles["counter"]
        frames = rounds = 0
        while not job.should_stop():
            totals = ta.get([c.add.remote(per_counter) for c in counters])
            frames += per_counter * len(counters)
            rounds += 1
            job.report(frames=frames, episodes=rounds, mean_return=float(sum(totals)), updates=rounds, note="x")
        job.save_model({"w": torch.arange(4.0)})


    def forever(job):
        """Loop until should_stop(), then ask every actor once more, as a program fetching final weights does."""
        import torchactors as ta
        _started(job)
        frames = 0
        while not job.should_stop():
            ta.get(job.roles["counter"][0].add.remote(1))
            frames += 1
            job.report(frames=frames)
            time.sleep(0.01)
        time.sleep(0.5)  # let any actor that would die of the Ctrl-C do so first
        final = ta.get([h.add.remote(0) for hs in job.roles.values() for h in hs])
        job.save_model({"final": torch.tensor(final)})


    def deaf(job):
        """Never looks at should_stop(): the runner must stop it after the grace period."""
        _started(job)
        while True:
            time.sleep(0.05)


    def fail(job):
        raise ValueError("the program failed on purpose")


    def crash_once(job):
        """SIGKILL the first counter once; its call made meanwhile waits for the restart."""
        import signal
        import torchactors as ta
        h = job.roles["counter"][0]
        pid = ta.get(h.whoami.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        assert ta.get(h.whoami.remote(), timeout=30)["pid"] != pid


    def quick(job):
        pass


    class Stuck:
        """A constructor that never returns, and does not take SIGTERM either."""
        def __init__(self, step=1, replica_index=None, seed=None):
            import signal
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            path = os.path.join(os.environ["CLI_STUCK_DIR"], str(os.getpid()))
            with open(path, "w") as f:
                f.write("stuck")
            while True:
                time.sleep(1)
''')

JOB = textwrap.dedent('''\
    job:
      name: clitest
      seed: 7
    roles:
      counter:
        class: clijobmod:Counter
        replicas: 2
        args: {step: 2}
        env: {CLI_TEST_FLAG: "yes"}
        max_task_retries: 2
      single:
        class: clijobmod:Counter
        args: {seed: 3}
    program: clijobmod:count
    stop:
      max_frames: 2000
''')


@pytest.fixture(scope="module")
def jobdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding clijobmod.py and job.yaml; the CLI runs from here."""
    d = tmp_path_factory.mktemp("clijob")
    (d / "clijobmod.py").write_text(JOBMOD)
    (d / "job.yaml").write_text(JOB)
    (d / "bad.yaml").write_text(JOB.replace("replicas: 2", "replica: 2"))
    return d


def _env(jobdir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(jobdir), str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("COLUMNS", None)
    return env


def torchactors(jobdir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `python -m torchactors.jobs.cli ARGS` from jobdir, as a user would run `torchactors`."""
    return subprocess.run([sys.executable, "-m", "torchactors.jobs.cli", *args], cwd=jobdir, env=_env(jobdir),
                          capture_output=True, text=True, timeout=timeout)


def start(jobdir: Path, *args: str) -> subprocess.Popen:
    """Start `torchactors ARGS` in a process group of its own, as a shell starts a foreground job."""
    return subprocess.Popen([sys.executable, "-m", "torchactors.jobs.cli", *args], cwd=jobdir, env=_env(jobdir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture
def inprocess(monkeypatch: pytest.MonkeyPatch, jobdir: Path):
    """Call cli.main in this process without leaking its sys.path / PYTHONPATH / cwd changes."""
    monkeypatch.setattr(sys, "path", [str(jobdir)] + sys.path)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    monkeypatch.chdir(jobdir)
    return cli.main


# --------------------------------------------------------------------------- validate


def test_validate_good_job_exits_0_and_counts_processes(jobdir):
    r = torchactors(jobdir, "validate", "job.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK: job.yaml (2 roles, 3 processes)"


def test_validate_applies_overrides(inprocess, capsys):
    assert inprocess(["validate", "job.yaml", "roles.counter.replicas=5", "stop.max_seconds=30"]) == 0
    assert capsys.readouterr().out.strip() == "OK: job.yaml (2 roles, 6 processes)"


def test_validate_bad_job_exits_2_with_file_line_and_allowed_keys(jobdir):
    r = torchactors(jobdir, "validate", "bad.yaml")
    assert r.returncode == 2
    assert r.stdout == ""
    assert "bad.yaml:7: unknown key 'replica' in roles.counter; allowed: args, class, device, env," in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("old,new,line", [
    ("seed: 7", "seed: !!int abc", 3),
    ("replicas: 2", "replicas: !!python/object/apply:os.getpid []", 7),
    ("args: {step: 2}", "args: !!set {step}", 8),
    ("replicas: 2", "replicas: 5000", 7),
    ("seed: 7", "<<: 5", 3),
    ("seed: 7", "seed: 7\x07", 3),
    ("args: {step: 2}", "args: &a {step: *a}", 8),
])
def test_validate_hostile_yaml_exits_2_with_file_line_and_no_traceback(jobdir, inprocess, capsys, old, new, line):
    (jobdir / "hostile.yaml").write_text(JOB.replace(old, new, 1))
    assert inprocess(["validate", "hostile.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"torchactors: hostile.yaml:{line}: ") and "; allowed: " in err, err
    assert "Traceback" not in err


def test_validate_bad_override_exits_2_naming_it(inprocess, capsys):
    assert inprocess(["validate", "job.yaml", "roles.counter.replicas=abc"]) == 2
    err = capsys.readouterr().err
    assert "override 'roles.counter.replicas=abc'" in err and "int >= 1" in err


@pytest.mark.parametrize("argv", [[], ["validate"], ["validate", "job.yaml", "--bogus"], ["plot"], ["launch", "x"]])
def test_usage_errors_exit_2(inprocess, argv):
    with pytest.raises(SystemExit) as info:
        inprocess(argv)
    assert info.value.code == 2


def test_missing_job_file_exits_2(inprocess, capsys):
    assert inprocess(["validate", "missing.yaml"]) == 2
    assert "missing.yaml: cannot read the job file" in capsys.readouterr().err


def test_run_with_a_bad_config_starts_nothing(jobdir, inprocess, capsys):
    out = jobdir / "never"
    assert inprocess(["run", "bad.yaml", "--out", str(out)]) == 2
    assert not out.exists()
    assert "unknown key 'replica'" in capsys.readouterr().err


def test_overrides_may_follow_the_out_option(inprocess, capsys):
    assert inprocess(["validate", "job.yaml", "stop.max_frames=5"]) == 0
    args = cli._parse(["run", "job.yaml", "a.b=1", "--out", "d", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.out == "d"


@pytest.mark.parametrize("module", ["torchactors", "torchactors.jobs.cli"])
def test_python_dash_m_runs_the_command_and_validate_starts_nothing(module, tmp_path):
    """`python -m torchactors` is the console script; validate exits 0 with no job directory made."""
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", module, "validate", str(MAIN_JOB)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"OK: {MAIN_JOB}")
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())     # no runtime, no job directory


def test_main_job_config_validates():
    r = subprocess.run([sys.executable, "-m", "torchactors.jobs.cli", "validate", str(MAIN_JOB)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"OK: {MAIN_JOB}")


# --------------------------------------------------------------------------- plot


def _synthetic_metrics(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    with (d / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(METRICS_COLUMNS)
        for i in range(1, 31):
            w.writerow([f"{i:.3f}", i * 1000, "1000.0", i * 3, "" if i < 3 else f"{10 + i * 5:.4f}", i * 2])


def test_plot_writes_curves_png(tmp_path, inprocess):
    _synthetic_metrics(tmp_path / "run")
    assert inprocess(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, inprocess, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    _synthetic_metrics(tmp_path / "run")
    assert inprocess(["plot", str(tmp_path / "run")]) == 1
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "run" / "curves.png").exists()


def test_plot_without_metrics_exits_1(tmp_path, inprocess, capsys):
    assert inprocess(["plot", str(tmp_path)]) == 1
    assert "metrics.csv" in capsys.readouterr().err


# --------------------------------------------------------------------------- the job context


def _context(tmp_path: Path, stop: str, clock=time.monotonic) -> JobContext:
    text = JOB.split("stop:")[0] + "stop: " + stop + "\n"
    return JobContext(parse_config(text, "job.yaml"), tmp_path, clock=clock)


def test_should_stop_at_max_frames(tmp_path, inprocess):
    job = _context(tmp_path, "{max_frames: 100}")
    job.report(frames=99)
    assert not job.should_stop()
    job.report(frames=100)
    assert job.should_stop() and job._check() == "max_frames"


def test_should_stop_at_target_return_but_not_on_nan(tmp_path, inprocess):
    job = _context(tmp_path, "{target_return: 195}")
    job.report(mean_return=float("nan"))
    assert not job.should_stop()
    job.report(mean_return=194.9)
    assert not job.should_stop()
    job.report(mean_return=195)
    assert job._check() == "target_return"


def test_should_stop_after_max_seconds_of_program_time(tmp_path, inprocess):
    now = [100.0]
    job = _context(tmp_path, "{max_seconds: 2}", clock=lambda: now[0])
    assert not job.should_stop()  # the program is not called yet: nothing counts
    job._begin()
    now[0] = 101.9
    assert not job.should_stop() and job.elapsed == pytest.approx(1.9)
    now[0] = 102.0
    assert job._check() == "max_seconds"


def test_ctrl_c_wins_and_the_first_reason_is_kept(tmp_path, inprocess):
    job = _context(tmp_path, "{max_frames: 10}")
    job._interrupt()
    job.report(frames=10)
    assert job._check() == "interrupted"
    job2 = _context(tmp_path, "{max_frames: 10, target_return: 5}")
    job2.report(frames=10)
    job2.report(mean_return=6)
    assert job2._check() == "max_frames"


def test_report_keeps_the_latest_values(tmp_path, inprocess):
    job = _context(tmp_path, "{}")
    job.report(frames=10, episodes=1, mean_return=2.5, updates=1, loss=0.1)
    job.report(frames=20)
    assert job._snapshot() == {"frames": 20, "episodes": 1, "mean_return": 2.5, "updates": 1}
    assert job._extra == {"loss": 0.1}
    assert not job.should_stop()


def test_save_model_writes_a_loadable_file(tmp_path, inprocess):
    import torch

    job = _context(tmp_path, "{}")
    path = job.save_model({"w": torch.ones(3)})
    assert path == tmp_path / "policy.pt"
    assert torch.equal(torch.load(path)["w"], torch.ones(3))
    assert job.config["roles"]["counter"]["class"] == "clijobmod:Counter"


# --------------------------------------------------------------------------- real runs (need the runtime)


ONE_COUNTER = "roles.counter.replicas=1"  # fewer processes to start where the test does not need them


def _summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mean_return", "episodes", "frames", "fps", "updates", "wall_s", "reached_target", "stopped_by",
                "store", "actors"):
        assert key in summary, key
    assert summary["stopped_by"] in STOP_REASONS
    return summary


def _wait_started(proc: subprocess.Popen, out: Path, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "started.json").exists():
            try:
                return json.loads((out / "started.json").read_text())
            except json.JSONDecodeError:
                pass  # being written
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before starting (rc {proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the job did not start within 60 s")


def _shm() -> set:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def _assert_all_gone(pids: list[int], shm_before: set) -> None:
    """No process of the job, no /dev/shm entry of its processes and no job directory remain after it exited.

    /dev/shm is shared with whatever else runs on the machine: only entries naming torchactors
    or one of the job's pids (torch's CUDA IPC files are torch_<pid>_*) count.
    """
    import psutil

    from torchactors.store import registry

    def ours(entry: str) -> bool:
        return "torchactors" in entry or any(re.search(rf"(?<!\d){pid}(?!\d)", entry) for pid in pids)

    job_dirs = str(Path(registry._base_dir()) / f"{pids[0]}-*")
    deadline = time.monotonic() + 5
    while True:
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        shm = sorted(e for e in _shm() - shm_before if ours(e))
        dirs = glob.glob(job_dirs)
        if not (left or shm or dirs):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: processes {left}, /dev/shm {shm}, job directories {dirs}")
        time.sleep(0.1)


@pytest.mark.timeout(90)
def test_run_writes_summary_metrics_and_model(jobdir, tmp_path):
    """Needs the runtime: a whole run to max_frames, with replicas, args, env, replica_index and seed."""
    out = tmp_path / "out"
    r = torchactors(jobdir, "run", "job.yaml", "program_args.per_counter=25", "--out", str(out), timeout=80)
    assert r.returncode == 0, r.stdout + r.stderr
    s = _summary(out)
    assert s["stopped_by"] == "max_frames" and s["frames"] >= 2000
    assert s["episodes"] == s["updates"] == s["frames"] // 50      # program_args: 25 frames x 2 counters
    assert s["reached_target"] is False
    assert s["actors"]["counter"]["count"] == 2 and s["actors"]["single"]["count"] == 1
    assert s["extra"] == {"note": "x"}
    assert s["fps"] > 0 and s["wall_s"] >= s["program_s"] > 0
    who = json.loads((out / "started.json").read_text())
    assert [w["index"] for w in who] == [0, 1, 0]
    assert [w["seed"] for w in who] == [7, 7, 3]     # job.seed, unless the role's args set one
    assert [w["retries"] for w in who] == [2, 2, 0]
    assert [w["flag"] for w in who] == ["yes", "yes", None]
    assert len({w["pid"] for w in who} | {os.getpid()}) == 4  # three actor processes
    with (out / "metrics.csv").open() as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == METRICS_COLUMNS and len(rows) >= 2
    assert int(rows[-1][1]) == s["frames"]
    import torch

    assert torch.equal(torch.load(out / "policy.pt")["w"], torch.arange(4.0))
    assert (out / "config.yaml").exists()
    assert "stopped by max_frames" in r.stdout


@pytest.mark.timeout(90)
def test_program_error_exits_1_with_a_summary(jobdir, tmp_path):
    """Needs the runtime."""
    out = tmp_path / "out"
    r = torchactors(jobdir, "run", "job.yaml", "program=clijobmod:fail", ONE_COUNTER, "--out", str(out),
                    timeout=80)
    assert r.returncode == 1
    assert "ValueError: the program failed on purpose" in r.stderr
    s = _summary(out)
    assert s["stopped_by"] == "error" and "failed on purpose" in s["error"]


@pytest.mark.timeout(90)
def test_the_summary_counts_restarts_per_role(jobdir, tmp_path):
    """Needs the runtime: the count comes from ta.actor_status, the public API."""
    out = tmp_path / "out"
    r = torchactors(jobdir, "run", "job.yaml", "program=clijobmod:crash_once", "roles.counter.max_restarts=1",
                    "--out", str(out), timeout=80)
    assert r.returncode == 0, r.stdout + r.stderr
    s = _summary(out)
    assert s["actors"]["counter"] == {"count": 2, "restarts": 1}
    assert s["actors"]["single"] == {"count": 1, "restarts": 0}


@pytest.mark.timeout(90)
def test_program_end_and_default_out_dir(jobdir, tmp_path):
    """Needs the runtime: a program that just returns; the run directory is runs/<name>-<time>."""
    r = torchactors(jobdir, "run", "job.yaml", "program=clijobmod:quick", ONE_COUNTER, timeout=80)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = sorted((jobdir / "runs").glob("clitest-*"))
    assert runs, list(jobdir.iterdir())
    assert _summary(runs[-1])["stopped_by"] == "program_end"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("program,presses,within", [("forever", 1, 10), ("deaf", 1, 15), ("deaf", 2, 10)])
def test_ctrl_c_stops_cleanly_and_leaves_nothing(jobdir, tmp_path, program, presses, within):
    """Needs the runtime: Ctrl-C gives exit code 130, a summary, and no process or /dev/shm entry left.

    SIGINT goes to the job's whole process group, actors included, as from a terminal: the
    actors must not die of it before the program has stopped.

    ``forever`` returns when should_stop() turns true; ``deaf`` never checks it and is stopped
    after the 5 s grace period, or at once on a second Ctrl-C.
    """
    import psutil

    out = tmp_path / "out"
    shm_before = _shm()
    proc = start(jobdir, "run", "job.yaml", f"program=clijobmod:{program}", "stop.max_frames=null", ONE_COUNTER,
                 "--out", str(out))
    try:
        _wait_started(proc, out)
        pids = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(pids) >= 3, pids  # the driver and two actors at least
        t0 = time.monotonic()
        for _ in range(presses):
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole foreground group
            time.sleep(0.3)
        rc = proc.wait(timeout=within + 10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read()
    assert rc == 130, output
    assert took < within, f"took {took:.1f}s"
    assert _summary(out)["stopped_by"] == "interrupted"
    if program == "forever":
        assert (out / "policy.pt").exists(), "the program's calls after Ctrl-C failed:\n" + output
    _assert_all_gone(pids, shm_before)


@pytest.mark.timeout(60)
def test_main_job_short_run(tmp_path):
    """Needs the runtime: the shipped IMPALA job, cut to a few thousand frames, ends well under a minute."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torchactors.jobs.cli", "run", str(MAIN_JOB), "stop.max_frames=20000",
                        "stop.max_seconds=40", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=55)
    assert r.returncode == 0, r.stdout + r.stderr
    s = _summary(out)
    assert s["stopped_by"] in ("max_frames", "target_return"), s
    assert s["frames"] >= 20000 or s["reached_target"]
    assert s["episodes"] > 0 and s["updates"] > 0 and s["mean_return"] is not None
    assert (out / "policy.pt").exists()


@pytest.mark.timeout(90)
def test_a_constructor_that_never_returns_fails_the_run_naming_the_role_after_start_timeout(jobdir, tmp_path):
    """Needs the runtime: exit 3, the role named, no traceback, no process left."""
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    shm0 = _shm()
    t0 = time.monotonic()
    proc = start(jobdir, "run", "job.yaml", "roles.counter.class=clijobmod:Stuck", "roles.counter.start_timeout=8",
                 f"roles.counter.env.CLI_STUCK_DIR={stuck}", "--out", str(tmp_path / "out"))
    out, _ = proc.communicate(timeout=80)
    took = time.monotonic() - t0
    assert proc.returncode == cli.EXIT_START_TIMEOUT == 3, out
    assert "role counter: 2 actor(s) did not finish the constructor within 8s (roles.counter.start_timeout)" in out
    assert "Traceback" not in out
    pids = [int(p) for p in os.listdir(stuck)]
    assert len(pids) == 2
    assert took < 50, took
    _assert_all_gone([proc.pid] + pids, shm0)
    assert _summary(tmp_path / "out")["stopped_by"] == "error"


def test_run_with_an_unsafe_base_dir_exits_1_saying_what_to_do_without_a_traceback(jobdir, tmp_path):
    """Needs the runtime's start only: the job directory is refused before any actor starts."""
    base = tmp_path / f"torchactors-{os.getuid()}"
    base.mkdir()
    os.chmod(base, 0o777)
    env = dict(_env(jobdir), XDG_RUNTIME_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "torchactors.jobs.cli", "run", "job.yaml", "--out",
                        str(tmp_path / "out")], cwd=jobdir, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"torchactors: job clitest not started: torchactors will not keep its job files in {base}" in r.stderr
    assert "chmod 700" in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(base) == []
