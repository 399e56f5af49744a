"""The supervisor: starts processes, watches their sentinels, restarts the fallen.

Box in the data flow: supervisor -> sentinel (pidfd) -> status file / restart. It starts any
``module:function`` target with its thread count, environment and ``PR_SET_PDEATHSIG`` so that
children die with their parent, in one of two ways (``ProcessSpec.start_method``):
``"zygote"`` (the default) forks it from the driver's zygote, a fresh interpreter that has
imported torch (runtime/zygote.py: milliseconds instead of a second); ``"spawn"`` starts a
fresh interpreter (for environment variables that libraries read when they are imported).
Both are CUDA-safe: neither is a fork of a process that may hold CUDA or running threads.
It knows nothing of actors.

All starting happens on the supervisor's own long-lived thread: PDEATHSIG fires when the
*thread* that forked the child exits, so children forked from a short-lived user thread would
die with it. The zygote, started on that thread, is the parent of forked children.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from torchactors.runtime.child import DRIVER_PID_VAR
from torchactors.runtime.job import Job, describe
from torchactors.runtime.status import ActorStatus
from torchactors.runtime.zygote import ForkedProcess, Zygote, ZygoteError, ZygoteUnsafe

logger = logging.getLogger(__name__)

START_METHODS = ("zygote", "spawn")


@dataclass(frozen=True)
class Backoff:
    """How long a restart waits after a crash: the first ``fast`` restarts start at once;
    each one after them waits ``initial`` seconds, doubling up to ``max``; a process that ran
    ``reset_after`` seconds before it died starts the count afresh (a new failure, not a loop)."""

    fast: int = 3
    initial: float = 0.2
    max: float = 10.0
    reset_after: float = 30.0

    @classmethod
    def parse(cls, value: Any) -> Backoff:
        """The ``restart_backoff`` option: None (the defaults), a Backoff, or a dict of some of
        its fields. Raises ValueError naming what is wrong."""
        if value is None or isinstance(value, Backoff):
            return value or cls()
        fields = ", ".join(f"{k}: {v}" for k, v in vars(cls()).items())
        if not isinstance(value, dict):
            raise ValueError(f"restart_backoff must be a dict with some of {{{fields}}}, not {value!r}")
        unknown = set(value) - set(vars(cls()))
        if unknown:
            raise ValueError(f"unknown restart_backoff key(s) {sorted(unknown)}; allowed: {{{fields}}}")
        fast = value.get("fast", cls.fast)
        if isinstance(fast, bool) or not isinstance(fast, int) or fast < 0:
            raise ValueError(f"restart_backoff fast must be an int >= 0 (restarts without delay), not {fast!r}")
        out: dict[str, Any] = {"fast": fast}
        for key in ("initial", "max", "reset_after"):
            v = value.get(key, getattr(cls, key))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"restart_backoff {key} must be a number of seconds >= 0, not {v!r}")
            out[key] = float(v)
        if out["max"] < out["initial"]:
            raise ValueError(f"restart_backoff max ({out['max']}) must be >= initial ({out['initial']})")
        return cls(**out)


def check_start_method(value: Any) -> str:
    if value not in START_METHODS:
        raise ValueError(f"start_method must be one of {', '.join(START_METHODS)}, not {value!r}")
    return value


@dataclass
class ProcessSpec:
    key: str                        # unique id in the job (an actor id)
    target: str                     # "module:function" called in the child as f(payload, ctx)
    payload: bytes
    num_threads: int = 1
    env: dict = field(default_factory=dict)
    max_restarts: int = 0
    device: str = "cpu"
    start_method: str = "zygote"
    backoff: Backoff = field(default_factory=Backoff)
    detached: bool = False          # outlives this process (no PDEATHSIG, spared at shutdown)


class _Proc:
    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self.incarnation = -1
        self.popen: subprocess.Popen | ForkedProcess | None = None
        self.pidfd = -1
        self.restarts_left = spec.max_restarts
        self.restart_at: float | None = None
        self.fast_left = spec.backoff.fast
        self.delay = spec.backoff.initial
        self.started_at = 0.0
        # exit_code and signal of the last incarnation that ended
        self.last_end: tuple[int | None, str | None] = (None, None)

    def next_delay(self) -> float:
        """Seconds until the restart after the death just seen (the back-off policy)."""
        policy = self.spec.backoff
        if time.monotonic() - self.started_at > policy.reset_after:
            self.fast_left, self.delay = policy.fast, policy.initial
        if self.fast_left > 0:
            self.fast_left -= 1
            return 0.0
        delay, self.delay = self.delay, min(self.delay * 2, policy.max)
        return delay

    def status(self, state: str, pid: int | None, **extra: Any) -> ActorStatus:
        """The record of this process in ``state``: every start after the first is a restart."""
        exit_code, sig = self.last_end
        fields = {"exit_code": exit_code, "signal": sig, "restarts_left": self.restarts_left,
                  "detached": self.spec.detached, **extra}
        return ActorStatus(state, max(self.incarnation, 0), pid, restarts=max(self.incarnation, 0), **fields)


class Supervisor:
    """The driver's (or an actor's) starter and watcher of child processes.

    It owns one long-lived thread, every process it started (``_Proc``: the spec, the current
    incarnation, its pidfd, the restart budget and back-off) and the zygote they are forked
    from. The local backend's ``Runtime`` asks it to start and kill (``start``, ``kill``;
    any thread), and it writes each process's ``ActorStatus`` to the job's status file on
    every change. See docs/design.md, "Spawning from one long-lived thread", "Actors are
    forked from a zygote" and "Actors in their own session".
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self.procs: dict[str, _Proc] = {}
        self._requests: queue.Queue[tuple] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._zygote: Zygote | None = None
        self._zygote_unsafe = False       # it refused once: spawn from then on
        self._thread = threading.Thread(target=self._run, name="torchactors-supervisor", daemon=True)
        self._thread.start()

    # -- requests (any thread) ------------------------------------------------------------

    def start(self, spec: ProcessSpec) -> None:
        self.job.write_status(spec.key, ActorStatus("starting", restarts_left=spec.max_restarts))
        self._request(("start", spec))

    def kill(self, key: str, wait: float = 5.0) -> None:
        """Stop ``key`` for good (no restart); waits up to ``wait`` seconds for it to exit."""
        self.job.mark_killed(key)
        done = threading.Event()
        self._request(("kill", key, done))
        done.wait(wait)

    def prestart(self) -> None:
        """Start the zygote now, in the background, so that the first start finds it ready."""
        self._request(("zygote",))

    @property
    def zygote_pid(self) -> int | None:
        """The pid of the zygote, if one is running."""
        z = self._zygote
        return z.pid if z is not None and z.alive() else None

    def restarts(self, key: str) -> int:
        p = self.procs.get(key)
        return 0 if p is None else max(p.incarnation, 0)

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._stopping:
            return
        done = threading.Event()
        self._request(("shutdown", done))
        done.wait(timeout)
        self._thread.join(timeout)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _request(self, req: tuple) -> None:
        self._requests.put(req)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # -- the supervisor thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            timers = [p.restart_at for p in self.procs.values() if p.restart_at is not None]
            timeout = max(0.0, min(timers) - now) if timers else None
            fds = [self._wake_r] + [p.pidfd for p in self.procs.values() if p.pidfd >= 0]
            ready, _, _ = select.select(fds, [], [], timeout)
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
            if not self._handle_requests():
                return
            for p in list(self.procs.values()):
                if p.pidfd >= 0 and p.pidfd in ready:
                    self._reap(p)
            now = time.monotonic()
            for p in list(self.procs.values()):
                if p.restart_at is not None and p.restart_at <= now:
                    p.restart_at = None
                    self._spawn(p)

    def _handle_requests(self) -> bool:
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                return True
            if req[0] == "start":
                p = _Proc(req[1])
                self.procs[req[1].key] = p
                self._spawn(p)
            elif req[0] == "kill":
                victim = self.procs.get(req[1])
                if victim is not None:
                    self._terminate([victim])
                else:       # not started yet (its constructor waits for arguments): it never will be
                    self.job.write_status(req[1], ActorStatus("dead", killed=True))
                req[2].set()
            elif req[0] == "zygote":
                try:
                    self._ready_zygote()
                except OSError as e:
                    logger.warning("could not start the zygote (the first start tries again): %s", e)
            elif req[0] == "shutdown":
                self._stopping = True
                self._terminate([p for p in self.procs.values() if not p.spec.detached])
                if self._zygote is not None:
                    self._zygote.close()
                    self._zygote = None
                req[1].set()
                return False

    def _spawn(self, p: _Proc) -> None:
        spec = p.spec
        p.incarnation += 1
        env = dict(os.environ)
        env.update({k: str(v) for k, v in spec.env.items()})
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(spec.num_threads)
        env.setdefault(DRIVER_PID_VAR, str(os.getpid()))      # set in the driver's children: theirs is kept
        boot = {"job": describe(self.job), "key": spec.key, "incarnation": p.incarnation,
                "target": spec.target, "payload": spec.payload, "num_threads": spec.num_threads,
                "device": spec.device, "sys_path": list(sys.path), "parent_pid": os.getpid(),
                "cwd": os.getcwd(), "detached": spec.detached}
        popen: subprocess.Popen | ForkedProcess | None
        try:
            popen = self._fork(env, boot) if spec.start_method == "zygote" else None
            if popen is None:
                popen = _spawn_interpreter(env, boot)
        except (OSError, BrokenPipeError) as e:
            logger.error("could not start %s: %s", spec.key, e)
            self.job.write_status(spec.key, p.status("dead", None, exit_code=None, signal=None, restarts_left=0,
                                                     error=str(e)))
            return
        p.popen = popen
        p.pidfd = popen.pidfd if isinstance(popen, ForkedProcess) else os.pidfd_open(popen.pid)
        p.started_at = time.monotonic()
        # With the previous incarnation's end: a caller that notices a death only after the
        # (fast) restart still learns how its incarnation ended.
        self.job.write_status(spec.key, p.status("alive", popen.pid))
        logger.debug("started %s incarnation %d as pid %d", spec.key, p.incarnation, popen.pid)

    def _reap(self, p: _Proc) -> None:
        popen = p.popen
        assert popen is not None, "only a started process is reaped"
        code = popen.wait()
        os.close(p.pidfd)
        p.pidfd = -1
        _sweep_torch_shm(popen.pid)
        exit_code, sig = (None, signal.Signals(-code).name) if code < 0 else (code, None)
        killed = self._stopping or self.job.was_killed(p.spec.key)
        restart = not killed and p.restarts_left != 0       # -1: unlimited
        delay = 0.0
        if restart:
            p.restarts_left -= p.restarts_left > 0
            delay = p.next_delay()
            p.restart_at = time.monotonic() + delay
        state = "restarting" if restart else "dead"
        p.last_end = (exit_code, sig)
        self.job.write_status(p.spec.key, p.status(state, popen.pid, killed=killed))
        if not killed:
            logger.warning("%s (pid %d) %s; %s", p.spec.key, popen.pid,
                           f"killed by {sig}" if sig else f"exited with code {exit_code}",
                           f"restarting in {delay:.1f}s" if restart else "not restarting")

    def _ready_zygote(self) -> Zygote | None:
        """The running zygote, or a new one if there is none (or it died)."""
        if self._zygote_unsafe:
            return None
        if self._zygote is not None and not self._zygote.alive():
            self._zygote.close()
            self._zygote = None
        if self._zygote is None:
            self._zygote = Zygote()
        return self._zygote

    def _fork(self, env: dict, boot: dict) -> ForkedProcess | None:
        """A child forked from the zygote; None if it must be spawned instead (the zygote
        found itself unsafe to fork: a bug or a strange site set-up, logged once)."""
        retried = False
        while True:
            zygote = self._ready_zygote()
            if zygote is None:
                return None
            try:
                return zygote.fork(env, boot)
            except ZygoteUnsafe as e:
                logger.error("the zygote cannot fork safely (%s); spawning every process of this job instead", e)
                self._zygote_unsafe = True
                zygote.close()
                self._zygote = None
                return None
            except ZygoteError as e:
                if retried:
                    raise OSError(str(e)) from None
                retried = True
                logger.warning("%s; starting a new zygote", e)

    def _terminate(self, procs: list[_Proc], grace: float = 1.0) -> None:
        """Stop ``procs`` for good: SIGTERM them all at once, then SIGKILL whoever is still
        there after ``grace``. One waiting for its restart is marked dead instead."""
        live: list[tuple[_Proc, subprocess.Popen | ForkedProcess]] = []
        for p in procs:
            waiting_restart, p.restart_at = p.restart_at is not None, None
            if p.popen is not None and p.pidfd >= 0:
                live.append((p, p.popen))
            elif p.popen is None or waiting_restart:
                self.job.write_status(p.spec.key, p.status("dead", None, exit_code=None, signal=None,
                                                           restarts_left=0, killed=True))
        for _, popen in live:
            try:
                popen.send_signal(signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        for p, popen in live:
            try:
                popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
            self._reap(p)


def _spawn_interpreter(env: dict, boot: dict) -> subprocess.Popen:
    """A fresh interpreter that runs ``child.main`` with the boot record on its stdin."""
    popen = subprocess.Popen([sys.executable, "-c", "from torchactors.runtime.child import main; main()"],
                             stdin=subprocess.PIPE, env=env, close_fds=True,
                             # Own session: a terminal's Ctrl-C goes to the driver, which
                             # stops the actors itself (PDEATHSIG still ties them to it).
                             start_new_session=True)
    stdin = popen.stdin
    assert stdin is not None, "started with stdin=PIPE"
    try:
        stdin.write(pickle.dumps(boot, protocol=pickle.HIGHEST_PROTOCOL))
        stdin.close()
    except BrokenPipeError:
        pass        # it died already: its pidfd says so, like any other death
    return popen


def _sweep_torch_shm(pid: int) -> None:
    """Remove the CUDA IPC ref-counter files torch leaves in /dev/shm when a process that
    exported CUDA tensors dies without cleanup (safe only once that process is gone)."""
    try:
        names = [n for n in os.listdir("/dev/shm") if n.startswith(f"torch_{pid}_")]
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass
