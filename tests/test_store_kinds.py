"""What comes back is what was put, for every tensor kind: a property-based test.

Kinds x dtypes x layouts x views, bare and nested in a structure, through ``put``/``get`` in
this process and through an actor call (argument and result). A kind either round-trips
exactly (class, dtype, shape, stride, storage offset, conj and neg bits, quantization scheme
and parameters, subclass attributes, ``requires_grad``) or ``put`` raises ``TypeError`` naming
what to do — never another error, never a different value.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import StoreProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchactors as ta
from torchactors import store

warnings.filterwarnings("ignore", message=".*(quantiz|nested|prototype|MaskedTensor).*")

DENSE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
                torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]


class Tagged(torch.Tensor):
    """A tensor subclass with attributes of its own (one of them a tensor)."""


def _masked():
    from torch.masked import MaskedTensor
    return MaskedTensor


def _values(shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-50, 50, shape, generator=g)
    if dtype == torch.bool:
        return base > 0
    if dtype.is_complex:
        return torch.complex(base.float(), base.flip(-1).float() if base.dim() else base.float()).to(dtype)
    if dtype == torch.uint8:
        return (base + 50).to(dtype)
    return base.to(dtype)


VIEWS = {
    "whole": lambda t: t,
    "offset": lambda t: t[1:],
    "transpose": lambda t: t.t(),
    "step": lambda t: t[:, ::2],
    "expand": lambda t: t[:1].expand(4, -1),
    "diagonal": lambda t: t.diagonal(),
    "row": lambda t: t[2],
}


@st.composite
def dense(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DENSE_DTYPES))
    rows, cols = draw(st.integers(3, 6)), draw(st.integers(2, 5))
    base = _values((rows, cols), dtype, draw(st.integers(0, 99)))
    if draw(st.integers(0, 4)) == 0:
        base.share_memory_()            # aliased, not copied: must come back the same way
    t = VIEWS[draw(st.sampled_from(sorted(VIEWS)))](base)
    if dtype.is_complex:
        bits = draw(st.sampled_from(["", "conj", "neg", "conj+neg"]))
        if "neg" in bits:
            t = torch._neg_view(t)
        if "conj" in bits:
            t = t.conj()
    if dtype.is_floating_point and draw(st.booleans()):
        t = t.detach().clone().requires_grad_(True) if draw(st.booleans()) else torch.nn.Parameter(t.clone())
    return t


@st.composite
def quantized(draw) -> torch.Tensor:
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    dtype = draw(st.sampled_from([torch.quint8, torch.qint8, torch.qint32]))
    if draw(st.booleans()):
        q = torch.quantize_per_tensor(x, draw(st.floats(0.01, 1.0)), draw(st.integers(0, 10)), dtype)
        return VIEWS[draw(st.sampled_from(["whole", "offset", "transpose", "step"]))](q)
    zero_points = torch.tensor([1, 2, 3]) if dtype != torch.quint8 or draw(st.booleans()) else torch.tensor([1.0, 2.0, 3.0])
    return torch.quantize_per_channel(x, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), zero_points, 1, dtype)


@st.composite
def sparse(draw) -> torch.Tensor:
    x = _values((4, 6), draw(st.sampled_from([torch.float32, torch.float64, torch.int64])), draw(st.integers(0, 99)))
    x = x * (x > 10)
    layout = draw(st.sampled_from(["coo", "csr", "csc", "bsr", "bsc"]))
    if layout == "coo":
        s = x.to_sparse()
        return s if draw(st.booleans()) else torch.sparse_coo_tensor(s._indices(), s._values(), s.shape)
    if layout in ("bsr", "bsc"):
        return getattr(x, f"to_sparse_{layout}")((2, 2))
    return getattr(x, f"to_sparse_{layout}")()


@st.composite
def other_kinds(draw) -> torch.Tensor:
    kind = draw(st.sampled_from(["subclass", "nested", "jagged", "masked"]))
    seed = draw(st.integers(0, 99))
    if kind == "subclass":
        t = _values((3, 4), torch.float32, seed)[:, 1:].as_subclass(Tagged)
        t.tag = "policy"
        t.extra = torch.arange(3)
        if draw(st.booleans()):
            t.requires_grad_(True)
        return t
    if kind in ("nested", "jagged"):
        parts = [_values((n, 3), torch.float32, seed + n) for n in draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))]
        return torch.nested.nested_tensor(parts, layout=torch.jagged if kind == "jagged" else torch.strided)
    data = _values((5,), torch.float32, seed)
    return _masked()(data, data > 0)


TENSORS = st.one_of(dense(), quantized(), sparse(), other_kinds())
WRAPS = {
    "bare": (lambda t: t, lambda v: v),
    "list": (lambda t: [t, 1], lambda v: v[0]),
    "dict": (lambda t: {"x": {"y": t}}, lambda v: v["x"]["y"]),
}


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert type(got) is type(want)
    assert got.requires_grad == want.requires_grad
    assert got.dtype == want.dtype and got.layout == want.layout and got.device == want.device
    if want.is_nested:
        assert len(got.unbind()) == len(want.unbind())
        for a, b in zip(got.unbind(), want.unbind(), strict=False):
            assert torch.equal(a, b)
        return
    if isinstance(want, _masked()):
        assert torch.equal(got.get_data(), want.get_data()) and torch.equal(got.get_mask(), want.get_mask())
        return
    assert got.shape == want.shape
    if want.layout != torch.strided:
        if want.layout == torch.sparse_coo:
            assert got.is_coalesced() == want.is_coalesced()
        assert torch.equal(got.detach().to_dense(), want.detach().to_dense())
        return
    assert got.stride() == want.stride() and got.storage_offset() == want.storage_offset()
    if want.is_quantized:
        assert got.qscheme() == want.qscheme()
        assert torch.equal(got.int_repr(), want.int_repr())
        if want.qscheme() == torch.per_tensor_affine:
            assert (got.q_scale(), got.q_zero_point()) == (want.q_scale(), want.q_zero_point())
        else:
            assert torch.equal(got.q_per_channel_scales(), want.q_per_channel_scales())
            assert torch.equal(got.q_per_channel_zero_points(), want.q_per_channel_zero_points())
            assert got.q_per_channel_axis() == want.q_per_channel_axis()
        assert torch.equal(got.dequantize(), want.dequantize())
        return
    assert got.is_conj() == want.is_conj() and got.is_neg() == want.is_neg()
    assert torch.equal(got.detach().resolve_conj().resolve_neg(), want.detach().resolve_conj().resolve_neg())
    assert getattr(got, "__dict__", {}).keys() == getattr(want, "__dict__", {}).keys()
    for k, v in getattr(want, "__dict__", {}).items():
        assert torch.equal(got.__dict__[k], v) if isinstance(v, torch.Tensor) else got.__dict__[k] == v


def round_trip_or_type_error(t: torch.Tensor, move) -> None:
    try:
        got = move(t)
    except TypeError as e:          # refused: must say what to do
        assert "store" in str(e) and ("(" in str(e) or "instead" in str(e)), str(e)
        return
    assert_same(got, t)


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@PROPERTY
@given(t=TENSORS, wrap=st.sampled_from(sorted(WRAPS)))
def test_every_kind_put_and_got_in_one_process_is_what_was_put(t, wrap):
    pack, unpack = WRAPS[wrap]
    round_trip_or_type_error(t, lambda x: unpack(store.get(store.put(pack(x)))))


@ta.actor(num_threads=1)
class Echo(StoreProcess):
    def echo(self, obj):
        return obj

    def echo_args(self, *args):
        return args

    def shares_storage(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.fixture(scope="module")
def echo():
    ta.init(num_threads=1)
    h = Echo.remote()
    ta.get(h.pid.remote())
    yield h
    ta.kill(h)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(t=TENSORS, wrap=st.sampled_from(sorted(WRAPS)))
def test_every_kind_through_an_actor_call_and_back_is_what_was_put(echo, t, wrap):
    pack, unpack = WRAPS[wrap]
    round_trip_or_type_error(t, lambda x: unpack(ta.get(echo.echo.remote(pack(x)))))


def test_conj_and_neg_views_keep_their_bits_bare_as_arguments_and_in_a_dict(echo):
    x = torch.arange(6.0).to(torch.complex64).reshape(2, 3) * (1 + 2j)
    for t in (x.conj(), torch._neg_view(x)):
        assert_same(store.get(store.put(t)), t)
        assert_same(ta.get(echo.echo.remote(t)), t)
        assert_same(ta.get(echo.echo.remote({"d": t}))["d"], t)


def test_quantized_tensor_keeps_scale_and_zero_point_and_dequantizes():
    q = torch.quantize_per_tensor(torch.linspace(-1, 1, 12).reshape(3, 4), 0.05, 7, torch.quint8)
    got = store.get(store.put(q))
    assert (got.q_scale(), got.q_zero_point()) == (0.05, 7)
    assert torch.equal(got.dequantize(), q.dequantize())


def test_subclass_comes_back_as_its_class_with_its_attributes():
    t = torch.ones(3).as_subclass(Tagged)
    t.tag = "policy"
    got = store.get(store.put({"w": t}))["w"]
    assert type(got) is Tagged and got.tag == "policy"


def test_a_kind_that_cannot_be_stored_is_a_type_error_naming_it():
    nj = torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)], layout=torch.jagged).transpose(1, 2)
    with pytest.raises(TypeError, match="ragged"):
        store.put(nj)
    q4 = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint4x2)
    with pytest.raises(TypeError, match="quantized"):
        store.put([q4])


# -- sharing at any depth, and one call's arguments as one put --------------------------------

def test_shared_tensors_nested_in_a_structure_alias_as_a_bare_shared_tensor_does():
    x = torch.zeros(4, 3).share_memory_()
    got = store.get(store.put({"a": [x, x[:, 1]]}))
    x[2, 1] = 5.0
    assert got["a"][0][2, 1].item() == 5.0 and got["a"][1][2].item() == 5.0
    got["a"][1][0] = 7.0
    assert x[0, 1].item() == 7.0


def test_a_list_of_views_passed_as_call_arguments_keeps_view_sharing(echo):
    x = torch.arange(12.0).reshape(4, 3)
    assert ta.get(echo.shares_storage.remote(x, x[:, 1]))
    back = ta.get(echo.echo_args.remote([x, x[:, 1]], x[2]))
    a, b = back[0]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    a[2, 1] = 100.0
    assert b[2].item() == 100.0
