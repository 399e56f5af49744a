"""Address-space limits: a peer costs little address space, and a peer whose tables cannot
be mapped is never taken for dead (no false OwnerDiedError, nothing it holds is released).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

MiB = 1 << 20


def run(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


FORKED_PEERS = """
    import os, pickle, resource, signal, torch
    from torchactors.store import core

    def vm_kib():
        return int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1])

    def fork_peer(job_dir, blob):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                st = core.attach(job_dir)
                held = pickle.loads(blob)            # it holds a ref to the parent's object
                ref = st.put(torch.full((256,), 5.0))
                out = pickle.dumps(ref)
                os.write(w, len(out).to_bytes(4, "little") + out)
                signal.pause()
            finally:
                os.kill(os.getpid(), signal.SIGKILL)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            n = int.from_bytes(f.read(4), "little")
            return pid, pickle.loads(f.read(n))
"""


def test_meeting_a_peer_reserves_megabytes_of_address_space_not_gigabytes():
    out = run(FORKED_PEERS + """
    st = core.current()
    mine = st.put(torch.ones(4))
    blob = pickle.dumps(mine)
    st.stats()
    before = vm_kib()
    peers = [fork_peer(st.job_dir, blob) for _ in range(6)]
    st.stats()                                   # meets all six: their tables are mapped
    assert len(st.membership.peers) == 6, st.membership.peers
    print((vm_kib() - before) / 6 / 1024)
    for pid, _ in peers:
        os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    per_peer_mib = float(out.stdout.strip())
    assert per_peer_mib < 16, per_peer_mib


def test_a_live_peer_whose_tables_cannot_be_mapped_is_never_taken_for_dead():
    out = run(FORKED_PEERS + """
    from torchactors.errors import OwnerDiedError, StoreFullError
    st = core.current()
    mine = st.put(torch.full((1024,), 7.0))
    slot = mine.slot
    pid, theirs = fork_peer(st.job_dir, pickle.dumps(mine))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_kib() * 1024 + 2 * (1 << 20), hard))
    try:
        st.get(theirs)
        print("read")
    except StoreFullError as e:
        print("full", "RLIMIT_AS" in str(e) and "alive" in str(e))
    except OwnerDiedError:
        print("false death")
    del mine
    st.stats()                                   # reclaim: the peer may hold ``mine``: kept
    print("kept", slot in st.entries)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    print("after", st.get(theirs)[0].item())
    print("kept", slot in st.entries)            # the peer still holds it
    os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:4] == ["full True", "kept True", "after 5.0", "kept True"], out.stdout


@pytest.mark.slow
def test_16_actors_work_under_ulimit_v_8g():
    out = run("""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    import torch, torchactors as ta

    @ta.actor(num_threads=1)
    class A:
        def add(self, t, k):
            return t + k

    ta.init(num_threads=1)
    x = torch.arange(1000.0)
    hs = [A.remote() for _ in range(16)]
    outs = ta.get([h.add.remote(x, i) for i, h in enumerate(hs)])
    assert all(torch.equal(o, x + i) for i, o in enumerate(outs))
    shifted = outs[1:] + outs[:1]                # each actor reads its neighbour's object
    outs = ta.get([h.add.remote(o, 1) for h, o in zip(hs, shifted)])
    assert all(torch.equal(o, x + (i + 1) % 16 + 1) for i, o in enumerate(outs))
    print("ok")
    ta.shutdown()
    """, timeout=600)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]
