"""The zygote: one fork server per driver, a fresh interpreter that has imported torch.

Box in the data flow: supervisor -> control socket -> zygote -> fork -> ``child.run(boot)``.

Importing torch costs about a second of CPU; a process forked from an interpreter that has
already imported it starts in milliseconds and shares those pages copy-on-write. The zygote
is started with spawn semantics (``python -c``, never a fork of the user's process), imports
torch and torchactors, and then does nothing but fork on request, so it holds no CUDA
context, no store, no user code and exactly one thread. It checks that before every fork
(``fork_safety_problem``) and refuses to fork otherwise: a fork with CUDA initialized or with
a thread pool running (torch's OpenMP pool, OpenBLAS's) gives a child that crashes or hangs.

The control socket (``SOCK_SEQPACKET``, one message per request or report) carries:

- driver -> zygote: ``b"fork <n>"`` with one fd, the read end of a pipe on which the driver then
  writes ``(environ, boot)``; the child reads it after the fork (so the user's classes are
  unpickled in the child, and the zygote never sees a secret or a payload);
- zygote -> driver: ``("ready",)`` or ``("unsafe", why)`` once; then per request
  ``("forked", n, pid)`` with a pidfd of the child (race-free: the zygote cannot have reaped
  it yet) or ``("refused", n, why)``; and ``("exit", pid, returncode)`` whenever it reaps a
  child. Only a parent can wait for an exit status: this is how the supervisor learns them.

Lifetimes: the zygote has ``PR_SET_PDEATHSIG`` to its driver's supervisor thread, each child
to the zygote, so SIGKILL of the driver takes the zygote and then every actor with it. If
the zygote dies, its children die too (they are reported as killed by SIGKILL) and the next
start makes a new zygote.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

from torchactors.runtime import child

logger = logging.getLogger(__name__)

READY_TIMEOUT = 120.0       # seconds a new zygote may take to import torch (a loaded machine)
ANSWER_TIMEOUT = 30.0       # seconds for the answer to a fork request
EXIT_REPORT_TIMEOUT = 10.0  # seconds from a child's death (its pidfd) to the zygote's report of it
# Loaded in the zygote and so shared by every child: what an actor process imports anyway.
PRELOAD = ("torch", "cloudpickle", "torchactors", "torchactors.actors.worker")
# Set in the zygote's environment before anything is imported: libraries that start a thread
# pool when they are loaded (numpy's OpenBLAS, which torch imports) would make it unsafe to fork.
SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1"}


class ZygoteError(RuntimeError):
    """The zygote cannot fork this child (gone, or it refuses); the caller starts another
    zygote or spawns instead."""


class ZygoteUnsafe(ZygoteError):
    """The zygote found itself unsafe to fork (CUDA initialized, or more than one thread)."""


class Zygote:
    """The driver's side of one zygote. Start it on the supervisor's long-lived thread: its
    ``PR_SET_PDEATHSIG`` fires when the thread that started it exits. Not thread-safe: only
    the supervisor's thread uses it."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env.update(SINGLE_THREAD_ENV)
        boot = {"parent_pid": os.getpid(), "sys_path": list(sys.path), "cwd": os.getcwd()}
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", "from torchactors.runtime.zygote import main; main()", str(theirs.fileno())],
                stdin=subprocess.PIPE, env=env, pass_fds=(theirs.fileno(),),
                # Own session: a terminal's Ctrl-C goes to the driver, which stops the actors itself.
                start_new_session=True)
            stdin = self.popen.stdin
            assert stdin is not None, "started with stdin=PIPE"
            stdin.write(pickle.dumps(boot, protocol=pickle.HIGHEST_PROTOCOL))
            stdin.close()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.pid = self.popen.pid
        self.ready = False
        self.dead = False
        self.requests = 0                   # fork requests sent; replies carry the number
        self.exits: dict[int, int] = {}     # reported, not yet collected by wait_exit

    def alive(self) -> bool:
        return not self.dead and self.popen.poll() is None

    def fork(self, environ: dict, boot: dict) -> ForkedProcess:
        """A child forked from the zygote that runs ``child.run(boot)`` with ``environ`` as its
        environment. Raises ZygoteError if the zygote is gone, late or refuses."""
        self._wait_ready()
        self.requests += 1
        seq = self.requests
        boot_r, boot_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                # The driver's stdout and stderr as they are now, as a spawned child would
                # inherit them: the zygote's own may have been redirected since it started.
                socket.send_fds(self.sock, [b"fork %d" % seq], [boot_r, 1, 2])
            except OSError as e:
                self.dead = True
                raise ZygoteError(f"the zygote (pid {self.pid}) is gone ({e})") from None
            finally:
                os.close(boot_r)
            deadline = time.monotonic() + ANSWER_TIMEOUT
            while True:
                msg, fds = self._next(max(0.0, deadline - time.monotonic()))
                if msg[1] == seq:
                    break
                for fd in fds:      # the late answer to a request that timed out: its child
                    os.close(fd)    # finds no boot record and exits
            if msg[0] == "refused":
                raise ZygoteUnsafe(msg[2])
            proc = ForkedProcess(self, msg[2], fds[0])
            try:
                # The child reads this right after the fork; a child that died first is seen
                # by its pidfd like any other death.
                with os.fdopen(boot_w, "wb", closefd=False) as f:
                    f.write(pickle.dumps((environ, boot), protocol=pickle.HIGHEST_PROTOCOL))
            except BrokenPipeError:
                pass
            return proc
        finally:
            os.close(boot_w)

    def _wait_ready(self) -> None:
        if not self.ready:
            msg, _ = self._next(READY_TIMEOUT)
            if msg[0] == "unsafe":
                raise ZygoteUnsafe(msg[1])
            self.ready = True

    def wait_exit(self, pid: int) -> int:
        """The return code of child ``pid`` (negative: killed by that signal), once its death
        is known (its pidfd is readable). A child of a zygote that died was killed by its
        PDEATHSIG: SIGKILL."""
        deadline = time.monotonic() + EXIT_REPORT_TIMEOUT
        while pid not in self.exits:
            if self.dead:
                return -signal.SIGKILL
            try:
                msg, fds = self._recv(max(0.0, deadline - time.monotonic()))
            except ZygoteError as e:
                if not self.dead:
                    logger.warning("no exit status for pid %d: %s", pid, e)
                return -signal.SIGKILL
            if msg[0] != "exit":
                for fd in fds:
                    os.close(fd)
                logger.warning("unexpected message from the zygote: %r", msg)
        return self.exits.pop(pid)

    def close(self) -> None:
        """Stop the zygote (its children, if any are left, die with it by their PDEATHSIG).
        Exit reports still unread are lost: ``wait_exit`` then says SIGKILL."""
        self.dead = True
        self.sock.close()
        self.popen.kill()
        self.popen.wait()

    def _next(self, timeout: float) -> tuple[tuple, list[int]]:
        """The next message that is not an exit report (those are kept for ``wait_exit``)."""
        deadline = time.monotonic() + timeout
        while True:
            msg, fds = self._recv(max(0.0, deadline - time.monotonic()))
            if msg[0] != "exit":
                return msg, fds

    def _recv(self, timeout: float) -> tuple[tuple, list[int]]:
        """One message and the fds it carries; an exit report is also kept in ``exits``."""
        self.sock.settimeout(max(0.001, timeout))
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 4096, 1)
        except TimeoutError:
            raise ZygoteError(f"the zygote (pid {self.pid}) did not answer within {timeout:.0f}s") from None
        except OSError as e:
            self.dead = True
            raise ZygoteError(f"the zygote (pid {self.pid}) is gone ({e})") from None
        for fd in fds:
            os.set_inheritable(fd, False)     # SCM_RIGHTS fds arrive inheritable
        if not data:
            self.dead = True
            raise ZygoteError(f"the zygote (pid {self.pid}) exited")
        msg = pickle.loads(data)
        if msg[0] == "exit":
            self.exits[msg[1]] = msg[2]
        return msg, fds


class ForkedProcess:
    """A child of the zygote, driven like ``subprocess.Popen`` (``pid``, ``wait``,
    ``send_signal``, ``kill``) through its pidfd, which works for a process that is not our
    child. The pidfd belongs to whoever watches it (the supervisor closes it)."""

    def __init__(self, zygote: Zygote, pid: int, pidfd: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.pidfd = pidfd
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            ready, _, _ = select.select([self.pidfd], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            self.returncode = self.zygote.wait_exit(self.pid)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass        # exited; its report is on the way

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# -- the zygote process ------------------------------------------------------------------------

def fork_safety_problem() -> str | None:
    """Why this process must not fork now, or None: CUDA initialized, or more than one thread
    (Python's or any native pool's, counted in /proc/self/task)."""
    import torch

    if torch.cuda.is_initialized():
        return "CUDA is initialized in the zygote"
    if threading.active_count() != 1:
        return f"the zygote runs {threading.active_count()} Python threads"
    tasks = os.listdir("/proc/self/task")
    if len(tasks) != 1:
        names = []
        for tid in tasks:
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    names.append(f.read().strip())
            except OSError:
                pass
        return f"the zygote runs {len(tasks)} threads ({', '.join(names)})"
    return None


def preload() -> None:
    """Import what every actor process imports, without running anything that starts a
    thread (no torch op: the first parallel one starts the OpenMP pool); then move those
    objects out of the garbage collector's reach so that collections in a child do not touch
    (and so copy) the shared pages."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


def main() -> None:
    """Entry point of the zygote process (``python -c``; argv[1]: the control socket's fd)."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    boot = pickle.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    child.die_with_parent(boot["parent_pid"])
    os.chdir(boot["cwd"])
    child.use_path(boot["sys_path"])
    preload()
    problem = fork_safety_problem()
    _send(sock, ("unsafe", problem) if problem else ("ready",))
    if problem:
        return
    _serve(sock)


def _send(sock: socket.socket, msg: tuple, fds: tuple = ()) -> None:
    try:
        socket.send_fds(sock, [pickle.dumps(msg)], list(fds))
    except OSError:
        os._exit(0)         # the driver is gone


def _serve(sock: socket.socket) -> None:
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)     # the wake-up fd does the work
    me = os.getpid()
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 4096):
                        break
                except BlockingIOError:
                    break
            _reap(sock)
        if sock.fileno() not in ready:
            continue
        data, fds, _, _ = socket.recv_fds(sock, 64, 3)
        if not data:
            os._exit(0)     # the driver closed: its actors are stopped already
        word, _, seq = data.decode("ascii", "replace").partition(" ")
        problem = fork_safety_problem()
        if problem or word != "fork" or not seq.isdigit() or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            _send(sock, ("refused", int(seq) if seq.isdigit() else -1, problem or f"bad request {data!r}"))
            continue
        pid = os.fork()
        if pid == 0:
            _become_child(fds, sock, (wake_r, wake_w), me)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        _send(sock, ("forked", int(seq), pid), (pidfd,))
        os.close(pidfd)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, ("exit", pid, os.waitstatus_to_exitcode(status)))


def _become_child(fds: list[int], sock: socket.socket, zygote_fds: tuple, zygote_pid: int) -> None:
    """In the forked child: drop the zygote's fds and signal set-up, take the driver's stdout
    and stderr, die with the zygote, take the driver's environment, run the target; never
    returns. ``fds``: the boot record's pipe, the driver's stdout, its stderr."""
    code = 1
    boot_fd, out_fd, err_fd = fds
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for fd in zygote_fds:
            os.close(fd)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.close(out_fd)
        os.close(err_fd)
        with os.fdopen(boot_fd, "rb") as f:
            environ, boot = pickle.loads(f.read())
        if not boot.get("detached"):
            child.die_with_parent(zygote_pid)
        os.setsid()
        os.environ.clear()
        os.environ.update(environ)
        numpy_random = sys.modules.get("numpy.random")
        if numpy_random is not None:
            # Its global generator would be a copy of the zygote's: every actor would draw the
            # same numbers (a spawned process seeds it afresh; Python's random reseeds on fork).
            numpy_random.seed()
        child.run(boot)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()     # what the interpreter of a spawned child runs at exit
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
