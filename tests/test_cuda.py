"""CUDA tensors in the store (torchactors/store/cuda.py).

The CPU tests check the plumbing that runs everywhere: dispatch to the CUDA reducer and
putter, the "c" meta layout, liveness errors before any CUDA call, the pin that keeps an
object alive while a view exists, and that installing the CUDA box initializes no CUDA.

The CUDA tests are adapted from PyTorch's CUDA multiprocessing tests (test/test_multiprocessing.py:
sharing, events, small tensors, mixed types, empty tensors, parameters, the actor/learner
state_dict queue), with torchactors actors in place of mp.Process + Queue.
"""

from __future__ import annotations

import collections
import copy
import gc
import logging
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

import torchactors as ta
from torchactors.runtime import child
from torchactors.store import core as store_core
from torchactors.store import cuda, records, serialize
from torchactors.store.refs import ObjectRef

HAS_CUDA = torch.cuda.is_available()


def _cuda(f):
    """A test that needs a GPU: marked ``cuda`` and skipped, with the reason, without one."""
    f = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device: torch.cuda.is_available() is False")(f)
    return pytest.mark.cuda(f)

SLEEP_CYCLES = 1_000_000_000        # torch.cuda._sleep: about half a second on current GPUs


def _torch_shm_files() -> list[str]:
    """torch's IPC ref-counter files of this process (unlinked once nothing exported lives)."""
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"torch_{os.getpid()}_"))
    except FileNotFoundError:
        return []


# -- actors (module level: the spawned process imports them by reference) ----------------------

@ta.actor(device="cuda", num_threads=1)
class GpuWorker:
    def __init__(self) -> None:
        self.held = None
        self.acc = None

    def fill(self, data: list, value: float) -> list:
        data[0][:] = value
        torch.cuda.synchronize()
        return [t.data_ptr() for t in data]

    def make_ones(self) -> tuple:
        t = torch.ones(5, 5, device="cuda")
        return t, t

    def mul2(self, t: torch.Tensor) -> None:
        t.mul_(2)
        torch.cuda.synchronize()

    def sums(self, items: list) -> list:
        ts = [ta.get(x) if isinstance(x, ta.ObjectRef) else x for x in items]
        return [(float(t.sum()), t.get_device(), t.numel(), t.untyped_storage().nbytes()) for t in ts]

    def accumulate(self, t: torch.Tensor) -> None:
        self.acc = t.clone() if self.acc is None else self.acc + t

    def total(self) -> list:
        return self.acc.tolist()

    def to_cpu(self, *ts: torch.Tensor) -> list:
        return [t.cpu() for t in ts]

    def describe(self, t: torch.Tensor) -> tuple:
        return type(t).__name__, t.dtype, tuple(t.shape), t.requires_grad, t.is_leaf, t.grad is None, t.device.type

    def fill_data(self, t: torch.Tensor, value: float) -> None:
        t.data[:] = value
        torch.cuda.synchronize()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated()

    def hold(self, state: dict) -> int:
        self.held = state
        return torch.cuda.memory_allocated()

    def add_one_to_held(self, key: str) -> None:
        self.held[key].add_(1)
        torch.cuda.synchronize()

    def held_sum(self, key: str) -> float:
        return float(self.held[key].double().sum())

    def echo(self, t: torch.Tensor) -> torch.Tensor:
        return t        # received over IPC: the runtime's put must clone it

    def put_nested(self) -> dict:
        return {"ref": ta.put(torch.arange(4.0, device="cuda"))}

    def get_nested(self, box: dict) -> list:
        return ta.get(box["ref"]).tolist()

    def consume(self, state: dict) -> list:
        return sorted({float(v.double().mean()) for v in state.values()})

    def cleanup(self) -> list:
        """Drop what this actor holds, reclaim, and list torch's IPC files it still has."""
        self.held = None
        self.acc = None
        gc.collect()
        ta.store.stats()
        torch.cuda.ipc_collect()
        return _torch_shm_files()


@ta.actor(device="cuda", num_threads=1)
class Learner:
    def __init__(self) -> None:
        self.net = torch.nn.LSTM(1, 1).cuda()

    def publish(self, i: int) -> dict:
        with torch.no_grad():
            for p in self.net.parameters():
                p.fill_(float(i))
        return copy.deepcopy(self.net.state_dict())

    def allocated(self) -> int:
        gc.collect()
        ta.store.stats()        # a reclaim point
        return torch.cuda.memory_allocated()

    def cleanup(self) -> list:
        self.net = None
        gc.collect()
        ta.store.stats()
        torch.cuda.ipc_collect()
        return _torch_shm_files()


# -- CPU: plumbing that runs without a GPU ------------------------------------------------------

def _fake_meta(**changes) -> tuple:
    fields = dict(kind="c", device=0, handle=b"h" * 64, storage_nbytes=16, storage_offset_bytes=0,
                  event_handle=None, dtype=torch.float32, shape=(4,), stride=(1,), storage_offset=0,
                  requires_grad=False, is_param=False)
    fields.update(changes)
    return tuple(fields[f] for f in records.CudaMeta._fields)       # the wire tuple


def test_store_registers_the_cuda_putter_getter_and_reducer():
    s = store_core.Store()
    try:
        assert records.BY_DEVICE["cuda"].put is cuda.put_cuda_tensor
        assert records.KINDS[records.CudaMeta].rebuild is cuda.get_cuda_tensor
        assert serialize.REDUCERS["cuda"] is cuda.reduce_cuda_tensor
        # Dispatch is by tensor_kind: a strided tensor on a CUDA device picks the CUDA reducer.
        fake_cuda = type("FakeCudaTensor", (), {"layout": torch.strided, "device": torch.device("cuda", 0),
                                                     "is_nested": False, "is_quantized": False})()
        assert serialize.REDUCERS[serialize.tensor_kind(fake_cuda)] is cuda.reduce_cuda_tensor
        # Structures still round-trip through their own kinds.
        small = s.put({"a": [1, 2], "m": torch.empty(3, device="meta")})
        big = s.put({"a": torch.arange(100_000)})
        assert (small.meta[0], big.meta[0]) == ("v", "p")
        assert s.get(small)["a"] == [1, 2] and s.get(small)["m"].device.type == "meta"
        assert torch.equal(s.get(big)["a"], torch.arange(100_000))
        del small, big
    finally:
        s.close()


def test_meta_device_tensors_take_the_meta_path_not_the_cuda_one():
    m = torch.empty(2, 3, device="meta")
    assert serialize.tensor_kind(m) == "meta"
    assert serialize.REDUCERS["meta"] is not cuda.reduce_cuda_tensor
    for ref in (ta.put(m), ta.put({"m": m})):
        assert ref.meta[0] in ("v", "p")
        out = ta.get(ref)
        out = out if isinstance(out, torch.Tensor) else out["m"]
        assert out.device.type == "meta" and out.shape == (2, 3)
    assert not torch.cuda.is_initialized() or HAS_CUDA


def test_cuda_meta_layout_is_what_the_getter_reads():
    meta = _fake_meta()
    described = records.meta_from_wire(meta)
    assert type(described) is records.CudaMeta
    assert records.CudaMeta._fields == ("kind", "device", "handle", "storage_nbytes", "storage_offset_bytes",
                                        "event_handle", "dtype", "shape", "stride", "storage_offset",
                                        "requires_grad", "is_param")
    assert described.handle == b"h" * 64 and described.dtype is torch.float32
    for wrong in (meta[:-1], ("t",) + meta[1:]):        # names no record: stays a tuple, get refuses it
        assert type(records.meta_from_wire(wrong)) is tuple
    # The putter writes that layout (an empty tensor needs no device to describe).
    p = torch.nn.Parameter(torch.empty(0, 3))
    put_meta, kept = cuda.share(p)
    assert kept is None and type(put_meta) is records.CudaMeta
    assert put_meta._asdict() == dict(
        kind="c", device=None, handle=None, storage_nbytes=0, storage_offset_bytes=0, event_handle=None,
        dtype=torch.float32, shape=(0, 3), stride=(3, 1), storage_offset=0, requires_grad=True, is_param=True)


def test_getter_reads_twelve_fields_and_checks_liveness_before_any_cuda_call():
    s = store_core.current()
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout.strip()
    ref = ObjectRef(1000, 7, 3, int(dead_pid), None, _fake_meta())      # an owner that is gone
    with pytest.raises(ta.OwnerDiedError):
        s.get(ref)
    bad = ObjectRef(1000, 7, 3, int(dead_pid), None, _fake_meta()[:-1])
    with pytest.raises(ValueError):
        s.get(bad)
    mine = ObjectRef(s.index, 4242, 99, os.getpid(), None, _fake_meta())  # never put here
    with pytest.raises(ta.ObjectFreedError):
        s.get(mine)
    assert not torch.cuda.is_initialized() or HAS_CUDA


class _CudaInSkeleton:
    """Pickles as a CUDA tensor would inside a structure: a rebuild call with its meta."""

    def __init__(self, meta: tuple) -> None:
        self.meta = meta

    def __reduce__(self):
        return (cuda.rebuild_cuda_tensor, (self.meta,))


def test_a_cuda_tensor_inside_a_structure_is_rebuilt_against_its_object():
    s = store_core.current()
    meta = _fake_meta(handle=b"not-exported-here")
    inline = s.put({"w": _CudaInSkeleton(meta)})
    with_bytes = s.put({"w": _CudaInSkeleton(meta), "big": torch.arange(100_000)})
    assert (inline.meta[0], with_bytes.meta[0]) == ("v", "p")
    for ref in (inline, with_bytes):
        # The rebuild knows which object it reads: live here, but no such storage was exported here.
        with pytest.raises(ta.ObjectFreedError, match="CUDA storage is gone"):
            s.get(ref)
        ta.free(ref)
        with pytest.raises(ta.ObjectFreedError) as info:
            s.get(ref)
        assert "CUDA storage" not in str(info.value)
    with pytest.raises(RuntimeError, match="only be rebuilt by torchactors' get"):
        cuda.rebuild_cuda_tensor(meta)


def test_an_export_holds_torchs_counter_slot_until_its_last_object_is_released(monkeypatch):
    # The bookkeeping around torch's IPC calls, with those calls recorded (they need a GPU):
    # puts of one storage share one export; its slot is handed back once, after the last.
    exports, released = [], []
    monkeypatch.setattr(torch.UntypedStorage, "_share_cuda_",
                        lambda self: exports.append(1) or (0, b"h" * 64, 16, 0, b"/torch_1_x", len(exports), b"",
                                                           False), raising=False)
    monkeypatch.setattr(torch.UntypedStorage, "_release_ipc_counter_cuda",
                        staticmethod(lambda name, offset: released.append((name, offset))))
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: None)
    storage = torch.arange(4.0).untyped_storage()       # stands in for a CUDA storage
    first, second = cuda._Kept(cuda._export(storage), None), cuda._Kept(cuda._export(storage), None)
    assert first.export is second.export and first.export.live == 2 and len(exports) == 1
    export = first.export
    del first
    gc.collect()
    assert released == [] and export.storage is storage, "the export must hold the memory while an object lives"
    del second
    gc.collect()
    assert released == [(b"/torch_1_x", 1)] and export.storage is None and not hasattr(storage, cuda._EXPORT)
    third = cuda._Kept(cuda._export(storage), None)     # a later put exports afresh
    assert len(exports) == 2
    del third
    gc.collect()
    assert released == [(b"/torch_1_x", 1), (b"/torch_1_x", 2)]


def test_alias_storage_keeps_its_pin_until_the_last_view_dies():
    class Pin:
        pass

    base = torch.arange(10, dtype=torch.float32)
    pin = Pin()
    alive = weakref.ref(pin)
    storage = cuda.alias_storage(base.untyped_storage(), base.untyped_storage().nbytes(), base.device, pin)
    t = torch.empty(0, dtype=torch.float32).set_(storage, 2, (3,), (2,))
    del storage, pin
    view = t[1:]
    assert t.tolist() == [2.0, 4.0, 6.0] and t.data_ptr() == base.data_ptr() + 8
    base[4] = 40.0
    assert view.tolist() == [40.0, 6.0]          # an alias, not a copy
    del t
    gc.collect()
    assert alive() is not None, "the pin must live as long as any view of the storage"
    del view
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("device, calls", [("cpu", []), ("cuda", []), ("cuda:0", [0]), ("cuda:3", [3])])
def test_an_actor_selects_its_device_by_index_before_its_constructor(monkeypatch, device, calls):
    # torch.cuda.set_device takes an index: given torch.device("cuda") it raises, which would
    # kill every device="cuda" actor at boot. "cuda" is the current device already.
    seen: list = []
    monkeypatch.setattr(torch.cuda, "set_device", seen.append)
    child.select_device(device)
    assert seen == calls and all(type(i) is int for i in seen)
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda._utils._get_device_index(torch.device("cuda"))     # what the old call hit


def test_installing_the_cuda_box_initializes_no_cuda():
    code = textwrap.dedent("""
        import sys, torch
        from torchactors.store import core, records, serialize
        s = core.Store()
        r = s.put({"a": torch.ones(3), "m": torch.empty(2, device="meta")})
        s.get(r)
        r2 = s.put(torch.ones(4))
        s.get(r2)
        assert "cuda" in serialize.REDUCERS and "cuda" in records.BY_DEVICE
        del r, r2
        s.close()
        sys.exit(3 if torch.cuda.is_initialized() else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"CUDA got initialized or the run failed:\n{proc.stdout}\n{proc.stderr}"


# -- CUDA: across real processes ----------------------------------------------------------------

@pytest.fixture(scope="module")
def worker():
    torch.zeros(1, device="cuda")       # create the context before the per-test fd baseline
    ta.init(num_threads=1)
    h = GpuWorker.remote()
    yield h
    ta.kill(h)


@pytest.fixture
def gpu(worker):
    """After each test: drop what the worker and this process hold, reclaim, and check torch's
    IPC files are gone (torch unlinks them once nothing exported lives)."""
    yield worker
    gc.collect()
    left = ta.get(worker.cleanup.remote(), timeout=60)
    gc.collect()
    ta.store.stats()
    torch.cuda.ipc_collect()
    assert left == [], f"the worker kept torch IPC files: {left}"
    assert _torch_shm_files() == [], f"this process kept torch IPC files: {_torch_shm_files()}"


@_cuda
def test_cuda_tensors_are_shared_with_an_actor_not_copied(gpu):
    x = torch.zeros(5, 5, device="cuda")
    data = [x, x[:, 1]]
    ptrs = ta.get(gpu.fill.remote(ta.put(data), 4.0), timeout=60)
    assert ptrs[1] - ptrs[0] == 4, "x[:, 1] must come back as a view one float into x"
    assert bool(x.eq(4).all()) and bool(data[1].eq(4).all())     # the actor wrote into our memory
    t1, t2 = ta.get(gpu.make_ones.remote(), timeout=60)
    assert bool(t1.eq(1).all()) and t1.data_ptr() == t2.data_ptr()
    assert t1.is_cuda and t1.untyped_storage().nbytes() == 25 * 4


@_cuda
def test_owner_get_is_a_view_of_the_kept_tensor_and_free_raises(gpu):
    t = torch.arange(6.0, device="cuda").view(2, 3)
    ref = ta.put(t)
    assert ref.meta[0] == "c" and ref.loc is None
    assert ref.meta.event_handle is not None
    back = ta.get(ref)
    assert back.data_ptr() == t.data_ptr() and torch.equal(back, t)
    ta.free(ref)
    with pytest.raises(ta.ObjectFreedError):
        ta.get(ref)
    with pytest.raises(ta.ActorError, match="ObjectFreedError"):
        ta.get(gpu.get_nested.remote({"ref": ref}), timeout=60)


@_cuda
def test_event_orders_a_cross_process_add_then_mul(gpu):
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        t = torch.ones(4, device="cuda")
        torch.cuda._sleep(SLEEP_CYCLES)     # without the event the actor's mul would run first
        t.add_(1)
        ref = ta.put(t)                     # records the event on `stream`, after the add
    ta.get(gpu.mul2.remote(ref), timeout=60)
    stream.synchronize()
    assert t.tolist() == [4.0, 4.0, 4.0, 4.0]


@_cuda
def test_many_small_tensors_from_one_allocation_block(gpu):
    tensors = [torch.arange(i * 5.0, (i + 1) * 5, device="cuda") for i in range(64)]
    refs = [ta.put(t) for t in tensors]
    handles = {r.meta.handle for r in refs}
    assert len(handles) < len(refs), "small tensors share cached allocation blocks"
    for results in (ta.get(gpu.sums.remote(refs), timeout=60), ta.get(gpu.sums.remote(tensors), timeout=60)):
        for i, (total, device, numel, nbytes) in enumerate(results):
            assert total == float(torch.arange(i * 5.0, (i + 1) * 5).sum())
            assert device == tensors[i].get_device() and numel == 5
            assert nbytes == 20         # the exported storage, not the whole cudaMalloc block


@_cuda
def test_send_many_small_tensors_and_sum_them(gpu):
    count = 500
    for i in range(count):
        t = torch.full([5], i, device="cuda", dtype=torch.long)
        gpu.accumulate.remote(t)
        del t
    assert ta.get(gpu.total.remote(), timeout=120) == [count * (count - 1) // 2] * 5


@_cuda
def test_mixed_dtypes_from_one_allocation(gpu):
    block = torch.empty(64, dtype=torch.uint8, device="cuda")
    as_float = block[:16].view(torch.float32).view(2, 2).fill_(1)
    as_byte = block[16:20].view(2, 2).zero_()
    as_half = block[32:40].view(torch.float16).fill_(2)
    refs = [ta.put(as_float), ta.put(as_byte), ta.put(as_half)]
    assert len({r.meta.handle for r in refs}) == 1
    f, b, h = ta.get(gpu.to_cpu.remote(*refs), timeout=60)
    assert torch.equal(f, torch.ones(2, 2)) and torch.equal(b, torch.zeros(2, 2, dtype=torch.uint8))
    assert torch.equal(h, torch.full((4,), 2, dtype=torch.float16))
    for _ in range(10):                     # separate small allocations, as in PyTorch's test
        ones = torch.ones(2, 2, device="cuda")
        zeros = torch.zeros(2, 2, device="cuda").byte()
        f, b = ta.get(gpu.to_cpu.remote(ones, zeros), timeout=60)
        assert torch.equal(f, torch.ones(2, 2)) and torch.equal(b, torch.zeros(2, 2, dtype=torch.uint8))


@_cuda
def test_empty_cuda_tensors(gpu):
    big = torch.ones(8, device="cuda")
    for empty in (torch.tensor([], dtype=torch.float32, device="cuda"),
                  torch.tensor([], dtype=torch.int64, device="cuda"),
                  torch.empty(0, 3, device="cuda"), big[:0]):
        ref = ta.put(empty)
        assert ref.meta.handle is None
        out = ta.get(ref)
        assert out.is_cuda and out.dtype == empty.dtype and out.shape == empty.shape
        kind, dtype, shape, *_, device = ta.get(gpu.describe.remote(empty), timeout=60)
        assert (kind, dtype, shape, device) == ("Tensor", empty.dtype, tuple(empty.shape), "cuda")


@_cuda
def test_parameter_sharing(gpu):
    p = torch.nn.Parameter(torch.arange(1.0, 26, device="cuda").view(5, 5))
    kind, dtype, shape, requires_grad, is_leaf, no_grad, device = ta.get(gpu.describe.remote(p), timeout=60)
    assert (kind, requires_grad, is_leaf, no_grad, device) == ("Parameter", True, True, True, "cuda")
    ta.get(gpu.fill_data.remote(p, 1.0), timeout=60)
    assert torch.equal(p.data, torch.ones(5, 5, device="cuda"))
    ip = torch.nn.Parameter(torch.arange(3, device="cuda"), requires_grad=False)
    kind, dtype, *_ = ta.get(gpu.describe.remote(ip), timeout=60)
    assert (kind, dtype) == ("Parameter", torch.int64)


@_cuda
def test_a_tensor_received_over_ipc_is_cloned_before_it_is_shared_again(gpu, caplog, monkeypatch):
    x = torch.arange(10.0, device="cuda")
    echoed = ta.get(gpu.echo.remote(x), timeout=60)        # the actor re-shared what it received
    assert torch.equal(echoed, x)
    got = ta.get(gpu.make_ones.remote(), timeout=60)[0]     # owned by the actor, received here
    monkeypatch.setattr(cuda, "_warned_clone", False)
    with caplog.at_level(logging.WARNING, logger="torchactors.store.cuda"):
        ref = ta.put(got)
        ta.put(got[1:])
    assert caplog.text.count("cannot be exported in place") == 1, "warned once"
    back = ta.get(ref)
    assert torch.equal(back, got) and back.data_ptr() != got.data_ptr()


@_cuda
def test_state_dict_broadcast_shares_one_gpu_copy(gpu):
    model = torch.nn.Linear(256, 256).cuda()
    ref = ta.put(model.state_dict())
    workers = [gpu, GpuWorker.remote(), GpuWorker.remote()]
    try:
        before = ta.get([w.allocated.remote() for w in workers], timeout=120)
        after = ta.get([w.hold.remote(ref) for w in workers], timeout=120)
        weight_bytes = model.weight.numel() * 4
        assert all(a - b < weight_bytes for a, b in zip(after, before, strict=False)), "mapped, not allocated, in the actors"
        ta.get(workers[0].add_one_to_held.remote("weight"), timeout=60)
        expected = float(model.weight.detach().double().sum())      # our copy changed too
        sums = ta.get([w.held_sum.remote("weight") for w in workers], timeout=60)
        assert sums == pytest.approx([expected] * 3)
    finally:
        for w in workers[1:]:
            assert ta.get(w.cleanup.remote(), timeout=60) == []
            ta.kill(w)


@_cuda
def test_actor_learner_state_dicts_through_a_bounded_queue_of_refs(gpu):
    learner = Learner.remote()
    try:
        base = ta.get(learner.allocated.remote(), timeout=120)
        queue: collections.deque = collections.deque()
        pending: collections.deque = collections.deque()
        seen = []
        for i in range(100):
            queue.append(learner.publish.remote(i))
            if len(queue) > 2:                          # at most 2 state_dicts waiting
                pending.append(gpu.consume.remote(queue.popleft()))
            if len(pending) > 2:
                seen.append(ta.get(pending.popleft(), timeout=60))
        while queue:
            pending.append(gpu.consume.remote(queue.popleft()))
        seen += ta.get(list(pending), timeout=60)
        assert seen == [[float(i)] for i in range(100)]
        del queue, pending
        gc.collect()
        end = ta.get(learner.allocated.remote(), timeout=60)
        assert end - base <= 8 * 4 * 512, f"the learner kept {end - base} bytes of released state_dicts"
        assert ta.get(learner.cleanup.remote(), timeout=60) == []
    finally:
        ta.kill(learner)


@_cuda
def test_get_after_the_owner_died_raises_owner_died_error(gpu):
    other = GpuWorker.remote()
    box = ta.get(other.put_nested.remote(), timeout=120)
    assert ta.get(box["ref"]).tolist() == [0.0, 1.0, 2.0, 3.0]
    ta.kill(other)
    with pytest.raises(ta.OwnerDiedError):
        ta.get(box["ref"])
