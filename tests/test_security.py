"""Other users and hostile neighbours: the base directory, the job files, a real second OS
user, floods of connections, malformed frames from a peer that holds the secret, a stopped
actor and a caller that stops reading."""

from __future__ import annotations

import json
import os
import pickle
import pwd
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import wait_for

import torchactors as ta
from torchactors.actors import protocol
from torchactors.runtime import job as job_module
from torchactors.runtime.transport import connect

REPO = str(Path(__file__).resolve().parents[1])


@ta.actor(num_threads=1)
class Echo:
    def pid(self) -> int:
        return os.getpid()

    def echo(self, x):
        return x


# -- the base directory and a second OS user --------------------------------------------------

@pytest.fixture
def other_user():
    """A real second OS user, made for this test and removed after it."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to create a second OS user")
    name = f"tahostile{os.getpid() % 100000}"
    subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def as_user(user: pwd.struct_passwd, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                          cwd="/", capture_output=True, text=True, timeout=30)


@pytest.fixture
def shared_tmp():
    """A directory like /tmp (mode 1777) that both users can reach."""
    top = tempfile.mkdtemp(prefix="ta-sec-", dir="/tmp")
    os.chmod(top, 0o1777)
    yield Path(top)
    shutil.rmtree(top, ignore_errors=True)


DRIVER = """
import json, os, sys
import torchactors as ta
out = {}
for root in sys.argv[1:]:
    os.environ["XDG_RUNTIME_DIR"] = root
    try:
        ta.init()
        out[root] = "ok"
        ta.shutdown()
    except PermissionError as e:
        out[root] = "refused: " + str(e)
print(json.dumps(out))
"""


def run_driver(*roots: Path) -> dict:
    """A root driver that tries ``ta.init()`` with each root as its XDG_RUNTIME_DIR."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["PYTHONPATH"] = REPO
    r = subprocess.run([sys.executable, "-c", DRIVER, *map(str, roots)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_base_dir_prepared_by_another_user_is_refused_and_nothing_is_written_through_it(other_user, shared_tmp):
    uid = os.getuid()
    target = shared_tmp / "precious"            # a root-owned file the attacker wants truncated
    target.write_text("precious")
    os.chmod(target, 0o644)
    roots = {k: shared_tmp / k for k in ("theirs", "link", "open", "unsticky", "ours")}
    for k in ("theirs", "link", "open", "ours"):
        roots[k].mkdir()
        os.chmod(roots[k], 0o1777)
    roots["unsticky"].mkdir()
    os.chown(roots["unsticky"], other_user.pw_uid, other_user.pw_gid)
    os.chmod(roots["unsticky"], 0o777)
    plant = " && ".join(f"ln -s {target} $B/{i}-deadbeef" for i in range(1, 50))
    # theirs: the attacker made the base dir, mode 0777, full of links to the target.
    r = as_user(other_user, f"B={roots['theirs']}/torchactors-{uid}; mkdir -m 777 $B && chmod 777 $B && {plant}")
    assert r.returncode == 0, r.stderr
    # link: the base dir is the attacker's link to a directory of theirs.
    r = as_user(other_user, f"mkdir -m 777 {roots['link']}/mine && ln -s {roots['link']}/mine "
                            f"{roots['link']}/torchactors-{uid}")
    assert r.returncode == 0, r.stderr
    # open: our own base dir, but left writable by everyone.
    (roots["open"] / f"torchactors-{uid}").mkdir()
    os.chmod(roots["open"] / f"torchactors-{uid}", 0o777)

    out = run_driver(*roots.values())

    assert out[str(roots["ours"])] == "ok"
    for k, why in (("theirs", f"owned by uid {other_user.pw_uid}"), ("link", "symbolic link"),
                   ("open", "written by group or others"), ("unsticky", "no sticky bit")):
        text = out[str(roots[k])]
        assert text.startswith("refused: ") and why in text, (k, text)
        assert "XDG_RUNTIME_DIR" in text and "rm -rf" in text        # what to do
    assert target.read_text() == "precious"
    assert os.listdir(roots["link"] / "mine") == []
    # The base dir we made ourselves is closed to the other user.
    ours = roots["ours"] / f"torchactors-{uid}"
    assert stat.S_IMODE(os.lstat(ours).st_mode) == 0o700
    r = as_user(other_user, f"ls {ours} || touch {ours}/x")
    assert r.returncode != 0 and not (ours / "x").exists()


PROBE = """
import json, os, socket, sys
out = {}
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sys.argv[1])
    out["socket"] = "connected"
except OSError as e:
    out["socket"] = type(e).__name__
for name in ("job_dir", "memfd"):
    try:
        with open(sys.argv[2 if name == "job_dir" else 3], "rb") as f:
            f.read(1)
        out[name] = "read"
    except OSError as e:
        out[name] = type(e).__name__
print(json.dumps(out))
"""


def test_another_user_reaches_neither_the_sockets_nor_the_files_nor_the_memfds_of_a_job(other_user):
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("needs a system python3 the other user can run")
    h = Echo.remote()
    pid = ta.get(h.pid.remote())
    ref = ta.put(torch.arange(1000.0))
    job = job_module.current()
    memfds = []
    for n in os.listdir("/proc/self/fd"):
        try:
            if "memfd:torchactors" in os.readlink(f"/proc/self/fd/{n}"):
                memfds.append(f"/proc/{os.getpid()}/fd/{n}")
        except OSError:
            pass        # the listing's own fd, closed already
    assert memfds
    r = subprocess.run([python, "-c", PROBE, _socket_path(h), os.path.join(job.dir, "actors", h._actor_id + ".json"),
                        memfds[0]], user=other_user.pw_uid, group=other_user.pw_gid, extra_groups=[], cwd="/",
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"socket": "PermissionError", "job_dir": "PermissionError",
                                    "memfd": "PermissionError"}
    assert ta.get(h.pid.remote()) == pid and float(ta.get(ref).sum()) == 499500.0


def test_actor_restarts_and_lookups_ignore_links_and_fifos_planted_in_the_job_dir(tmp_path):
    """Even a neighbour that could write into the job dir neither blocks a restart (a planted
    ``.killed``), injects error text (a planted ``.error``), truncates a file through a link,
    nor hangs a reader (a FIFO where a status or name file belongs)."""
    target = tmp_path / "precious"
    target.write_text("precious")
    h = Echo.options(max_restarts=1, name="sec-echo").remote()
    pid = ta.get(h.pid.remote())
    job = job_module.current()
    actors = Path(job.dir) / "actors"
    aid = h._actor_id
    (actors / f"{aid}.killed").symlink_to(target)
    (actors / f"{aid}.error").symlink_to(target)
    os.mkfifo(Path(job.dir) / "names" / "sec-fifo")

    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: getattr(job.read_status(aid), "incarnation", None) == 1
                    and job.read_status(aid).state == "alive", 15)
    assert job.read_status(aid).pid != pid               # restarted: the link did not count as a kill
    assert job.read_error(aid) == ""                        # the link's target is not read as error text
    job.write_error(aid, "boom")                            # replaces the link, never writes through it
    assert job.read_error(aid) == "boom" and target.read_text() == "precious"
    assert not (actors / f"{aid}.error").is_symlink()
    assert stat.S_IMODE(os.lstat(actors / f"{aid}.error").st_mode) == 0o600
    with pytest.raises(ValueError, match="no actor named"):
        ta.get_actor("sec-fifo")                            # a FIFO is not a name file (and no hang)
    assert job.lookup_name("sec-echo")["actor_id"] == aid
    (actors / f"{aid}.json").unlink()
    os.mkfifo(actors / f"{aid}.json")
    assert job.read_status(aid) is None                     # no hang on a FIFO either
    assert target.read_text() == "precious"


def test_job_files_are_private_and_written_whole(tmp_path):
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    job_module.write_file(str(d), "f", b"x" * 100_000)
    assert (d / "f").read_bytes() == b"x" * 100_000
    assert stat.S_IMODE(os.stat(d / "f").st_mode) == 0o600
    with pytest.raises(FileExistsError):
        job_module.write_file(str(d), "f", b"y", exclusive=True)
    assert (d / "f").read_bytes() == b"x" * 100_000
    assert sorted(os.listdir(d)) == ["f"]                   # no temporary left behind
    (d / "link").symlink_to(d / "f")
    assert job_module.read_file(str(d), "link") is None
    link_dir = tmp_path / "linkdir"
    link_dir.symlink_to(d)
    with pytest.raises(OSError):
        job_module.write_file(str(link_dir), "g", b"z")     # a job dir that is a link is not used
    assert not (d / "g").exists()


# -- broken and flooding peers ------------------------------------------------------------------

@ta.actor(num_threads=1)
class Target:
    def pid(self) -> int:
        return os.getpid()

    def echo(self, x):
        return x

    def first(self, i, blob=None):
        return i

    def blob(self, n: int) -> bytes:
        return b"z" * n

    def limit_fds(self, headroom: int) -> int:
        """Lower this process's fd limit to what it has open now plus ``headroom``."""
        import resource

        n = len(os.listdir("/proc/self/fd"))
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + headroom, hard))
        return n + headroom


@pytest.fixture(scope="module")
def target():
    h = Target.remote()
    ta.get(h.pid.remote())
    yield h
    ta.kill(h)


def _socket_path(h) -> str:
    job = job_module.current()
    return job.socket_path(h._actor_id, job.read_status(h._actor_id).incarnation)


def _closed_by_peer(sock: socket.socket, seconds: float = 10.0) -> bool:
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


class Unloadable:
    """Pickles fine; raises while being unpickled, as a class whose state check fails does."""

    def __reduce__(self):
        return (_refuse_to_load, ("bad state",))


def _refuse_to_load(why: str):
    raise ValueError(why)


def _roundtrip(conn, msg: bytes) -> bytes:
    """Send one request on a raw authenticated connection and read one reply."""
    conn.send(msg)
    deadline = time.monotonic() + 10
    while True:
        got = conn.buffered()
        if got:
            return got[0]
        assert time.monotonic() < deadline, "no reply"
        if select.select([conn], [], [], 1)[0]:
            got = conn.read_available()
            if got:
                return got[0]


MALFORMED = {
    "empty message": b"",
    "truncated header": b"\x01\x00\x00\x00\x00",
    "unknown kind": protocol.REQ.pack(99, 1, 0, 0),
    "method name past the end": protocol.REQ.pack(protocol.CALL, 1, 0, 500) + b"echo",
    "method name not UTF-8": protocol.REQ.pack(protocol.CALL, 1, 0, 2) + b"\xff\xfe",
    "garbage pickle": protocol.request(protocol.CALL, 1, 0, "echo", b"\x80\x05garbage"),
    "not a pickle at all": protocol.request(protocol.CALL, 1, 0, "echo", b"hello"),
    "truncated pickle": protocol.request(protocol.CALL, 1, 0, "echo", pickle.dumps(((1,), {}))[:-3]),
    "pickle of the wrong shape": protocol.request(protocol.CALL, 1, 0, "echo", pickle.dumps(5)),
    "pickle of a wrong pair": protocol.request(protocol.CALL, 1, 0, "echo", pickle.dumps(([1], {}))),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frame_from_a_peer_with_the_secret_closes_only_its_connection(target, case):
    pid = ta.get(target.pid.remote())
    job = job_module.current()
    conn = connect(_socket_path(target), job.secret, timeout=10)
    bystander = connect(_socket_path(target), job.secret, timeout=10)
    try:
        payload = MALFORMED[case]
        conn.sock.sendall(struct.pack("<I", len(payload)) + payload)
        assert _closed_by_peer(conn.sock), f"{case}: the connection stayed open"
        assert ta.get(target.echo.remote(case), timeout=10) == case        # the actor serves on
        assert protocol.parse_reply(_roundtrip(bystander, protocol.request(protocol.PING, 7, 0)))[1] == 7
        assert ta.get(target.pid.remote()) == pid
    finally:
        conn.close()
        bystander.close()


def test_huge_declared_length_closes_the_connection_without_waiting_for_the_bytes(target):
    conn = connect(_socket_path(target), job_module.current().secret, timeout=10)
    try:
        conn.sock.sendall(struct.pack("<I", 0xFFFFFFFF) + b"x" * 100)
        assert _closed_by_peer(conn.sock, 5)
    finally:
        conn.close()
    assert ta.get(target.echo.remote(1), timeout=10) == 1


def test_well_formed_calls_that_fail_get_an_error_reply_on_a_connection_that_stays_open(target):
    conn = connect(_socket_path(target), job_module.current().secret, timeout=10)
    try:
        for i, (method, body) in enumerate([("no_such_method", protocol.EMPTY_ARGS),
                                            ("echo", pickle.dumps(((), {"nope": 1}))),
                                            ("echo", pickle.dumps(((1, 2, 3), {}))),
                                            ("echo", pickle.dumps(((Unloadable(),), {})))], 1):
            kind, seq, _, _ = protocol.parse_reply(_roundtrip(conn, protocol.request(protocol.CALL, i, 0, method, body)))
            assert (kind, seq) == (protocol.ERROR, i)
        kind, _, _, body = protocol.parse_reply(_roundtrip(conn, protocol.request(
            protocol.CALL, 9, 0, "echo", pickle.dumps(((5,), {})))))
        assert (kind, pickle.loads(body)) == (protocol.OK_VALUE, 5)
    finally:
        conn.close()


FLOODER = """
import collections, socket, sys
path, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = collections.deque()
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
    except OSError:
        pass                            # the listen queue is full: still an attempt
    if i % 3 == 0:
        s.close()                       # connect, close
        continue
    if i % 3 == 1:
        try:
            s.send(b"not an answer" * 5)
        except OSError:
            pass
    held.append(s)                      # connect, hold (silent or garbage)
    while len(held) > hold:
        held.popleft().close()
print(n, flush=True)
sys.stdin.readline()                    # hold the last connections until the test has counted
for s in held:
    s.close()
"""


def _flood(target, attempts: int, capfd) -> None:
    pid = ta.get(target.pid.remote())
    limit = ta.get(target.limit_fds.remote(40))
    path = _socket_path(target)
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, path, str(attempts), "300"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    done: list = []
    threading.Thread(target=lambda: done.append(flooder.stdout.readline()), daemon=True).start()
    most_fds, calls = 0, 0
    try:
        deadline = time.monotonic() + 120
        while not done and flooder.poll() is None and time.monotonic() < deadline:
            assert ta.get(target.echo.remote(calls), timeout=10) == calls     # an authenticated caller
            calls += 1
            most_fds = max(most_fds, len(os.listdir(f"/proc/{pid}/fd")))
        # the flooder holds its last 300 connections now: the actor is at its limit
        for _ in range(20):
            most_fds = max(most_fds, len(os.listdir(f"/proc/{pid}/fd")))
            time.sleep(0.01)
        out, _ = flooder.communicate("\n", timeout=60)
        out = done[0] if done else out
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()
    assert flooder.returncode == 0 and int(out) == attempts
    # It ran out of fds for real, and survived it.
    assert most_fds >= limit - 2, (most_fds, limit)
    assert ta.get(target.pid.remote(), timeout=10) == pid
    conn = connect(path, job_module.current().secret, timeout=10)            # a new caller gets in
    conn.send(b"\xff" * 8)                                                   # and breaks the protocol
    assert _closed_by_peer(conn.sock)
    conn.close()
    err = capfd.readouterr().err
    assert "out of file descriptors" in err and "malformed message" in err  # both were logged
    assert ta.get(target.echo.remote("after"), timeout=10) == "after"


def test_an_actor_out_of_fds_survives_5000_unauthenticated_connections_and_keeps_serving(capfd):
    h = Target.remote()
    try:
        _flood(h, 5000, capfd)
    finally:
        ta.kill(h)


# -- a stopped actor ------------------------------------------------------------------------------

def _timed_calls(calls, seconds: float) -> list:
    """Run ``calls()`` on a thread; fail (rather than hang the suite) if it has not returned
    within ``seconds``."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(calls()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f".remote() calls blocked for more than {seconds} s"
    return out[0]


def test_remote_never_blocks_on_a_stopped_actor_and_queued_calls_arrive_in_order(target):
    pid = ta.get(target.pid.remote())
    other = Target.remote()
    ta.get(other.pid.remote())
    blob = b"x" * 100_000
    os.kill(pid, signal.SIGSTOP)
    try:
        def calls():
            refs, slowest = [], 0.0
            for i in range(300):            # 30 MB: far more than the socket holds
                t0 = time.perf_counter()
                refs.append(target.first.remote(i, blob) if i % 2 else target.first.remote(i))
                slowest = max(slowest, time.perf_counter() - t0)
            return refs, slowest
        refs, slowest = _timed_calls(calls, 20)
        assert slowest < 0.5, slowest
        with pytest.raises(ta.GetTimeoutError):
            ta.get(refs[-1], timeout=0.2)
        assert ta.get(other.first.remote(7), timeout=10) == 7      # other actors are not held up
    finally:
        os.kill(pid, signal.SIGCONT)
    assert ta.get(refs, timeout=60) == list(range(300))
    assert ta.get(target.first.remote("after"), timeout=10) == "after"
    ta.kill(other)


def test_calls_queued_for_a_stopped_actor_fail_when_it_is_killed(target):
    h = Target.remote()
    pid = ta.get(h.pid.remote())
    os.kill(pid, signal.SIGSTOP)
    refs = _timed_calls(lambda: [h.first.remote(i, b"y" * 200_000) for i in range(50)], 20)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ta.ActorDiedError):
        ta.get(refs[-1], timeout=10)
    with pytest.raises(ta.ActorDiedError):
        ta.get(refs[0], timeout=10)


def test_big_str_and_bytes_results_travel_through_the_store(target):
    assert ta.get(target.blob.remote(3_000_000), timeout=30) == b"z" * 3_000_000


def test_a_request_over_the_message_bound_is_refused_before_it_is_sent(target, monkeypatch):
    from torchactors.actors import channel

    monkeypatch.setattr(channel, "MAX_MESSAGE", 4096)
    with pytest.raises(ValueError, match="more than a message holds"):
        target.first.remote(0, b"q" * 10_000)
    assert ta.get(target.first.remote(1, b"q" * 100), timeout=10) == 1     # the channel is fine


def test_a_caller_that_stops_reading_does_not_stall_the_actor_for_others(target):
    """The reverse of a stopped actor: a caller (with the secret) sends calls whose replies
    fill its socket and reads none of them; the actor goes on serving everyone else, and the
    replies arrive whole and in order once that caller reads."""
    conn = connect(_socket_path(target), job_module.current().secret, timeout=10)
    try:
        n, size = 60, 600_000          # 36 MB of inline replies: far more than a socket holds
        for i in range(1, n + 1):
            conn.send(protocol.request(protocol.CALL, i, 0, "blob", pickle.dumps(((size,), {}))))
        time.sleep(0.5)                # the actor has answered what it could and is stuck on the rest
        t0 = time.monotonic()
        assert ta.get(target.first.remote("others"), timeout=10) == "others"
        assert time.monotonic() - t0 < 5
        got = []
        while len(got) < n:
            assert select.select([conn], [], [], 10)[0], f"only {len(got)} of {n} replies came"
            got += conn.read_available()
        for i, msg in enumerate(got, 1):
            kind, seq, _, body = protocol.parse_reply(msg)
            assert (kind, seq) == (protocol.OK_VALUE, i) and pickle.loads(body) == b"z" * size
    finally:
        conn.close()
