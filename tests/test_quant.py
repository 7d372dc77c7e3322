import math

import pytest
import torch

import tritonact
from tritonact.quant import NAN_CODE, pack_codes, unpack_codes

BITS = (1, 2, 4, 8)
SHAPES = [(1, 1, 5), (2, 3, 7, 7), (1, 63, 3, 5), (3, 4), (2, 3, 2, 3, 3)]


def shape_id(s):
    return "x".join(map(str, s))


def formula_codes(x, bits, lo, step):
    """The documented contract, written out element by element in the logical (not memory) order."""
    C = x.shape[1]
    view = [1, C] + [1] * (x.dim() - 2)
    r = 1.0 / step
    t = (x.float() - lo.view(view)) * r.view(view)
    q = torch.floor(t).clamp(0, 2**bits - 1)
    q = torch.where(torch.isnan(t), torch.full_like(q, NAN_CODE), q)
    return q.to(torch.uint8)


def formula_decode(q, lo, step, dtype):
    view = [1, lo.numel()] + [1] * (q.dim() - 2)
    return (lo.view(view) + (q.float() + 0.5) * step.view(view)).to(dtype)


def make(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    C = shape[1]
    lo = -4 + torch.rand(C, generator=g)
    step = 0.05 + torch.rand(C, generator=g) * 2
    return x, lo, step


def packed_codes(p):
    """Codes of a PackedTensor back in logical order (via the documented layout)."""
    perm_shape = [p.shape[d] for d in p.perm]
    q = unpack_codes(p.data, p.bits, p.numel).view(perm_shape)
    inv = [0] * len(p.perm)
    for i, d in enumerate(p.perm):
        inv[d] = i
    return q.permute(inv)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_codes_and_decode_match_formula_bit_for_bit(bits, shape):
    x, lo, step = make(shape)
    p = tritonact.quantize(x, bits, lo, step, backend="torch")
    assert p.data.numel() == math.ceil(x.numel() * bits / 8)
    torch.testing.assert_close(packed_codes(p), formula_codes(x, bits, lo, step), rtol=0, atol=0)
    y = tritonact.dequantize(p, backend="torch")
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, formula_decode(formula_codes(x, bits, lo, step), lo, step, x.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_half_dtypes(bits, dtype):
    x, lo, step = make((2, 3, 5, 5), dtype)
    p = tritonact.quantize(x, bits, lo, step, backend="torch")
    torch.testing.assert_close(packed_codes(p), formula_codes(x, bits, lo, step), rtol=0, atol=0)
    y = p.dequantize(backend="torch")
    assert y.dtype == dtype
    torch.testing.assert_close(y, formula_decode(formula_codes(x, bits, lo, step), lo, step, dtype), rtol=0, atol=0)


@pytest.mark.parametrize("bits", BITS)
def test_channels_last_keeps_memory_format_and_codes(bits):
    x, lo, step = make((2, 5, 3, 7))
    xcl = x.contiguous(memory_format=torch.channels_last)
    p = tritonact.quantize(xcl, bits, lo, step, backend="torch")
    torch.testing.assert_close(packed_codes(p), formula_codes(x, bits, lo, step), rtol=0, atol=0)
    # codes are in memory order: channel is the fastest-moving index
    q_mem = unpack_codes(p.data, bits, x.numel())
    torch.testing.assert_close(q_mem, formula_codes(x, bits, lo, step).permute(0, 2, 3, 1).reshape(-1), rtol=0, atol=0)
    y = tritonact.dequantize(p, backend="torch")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == xcl.stride()


def test_byte_layout_is_pinned():
    # 1 channel, lo = 0, step = 1: code == floor(x). Eight 1-bit codes LSB first; 4-bit codes two per byte.
    lo, step = torch.zeros(1), torch.ones(1)
    x = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 1, 1]]).view(1, 1, 9)
    p = tritonact.quantize(x, 1, lo, step, backend="torch")
    assert p.data.tolist() == [0b1000_0001, 0b0000_0001]
    x4 = torch.tensor([3.0, 10.0, 15.0]).view(1, 1, 3)
    p4 = tritonact.quantize(x4, 4, lo, step, backend="torch")
    assert p4.data.tolist() == [0xA3, 0x0F]
    x2 = torch.tensor([1.0, 2.0, 3.0, 0.0, 2.0]).view(1, 1, 5)
    p2 = tritonact.quantize(x2, 2, lo, step, backend="torch")
    assert p2.data.tolist() == [0b00_11_10_01, 0b10]
    assert p2.nbytes == 2 + 8


@pytest.mark.parametrize("bits", BITS)
def test_non_finite_values(bits):
    lo, step = torch.tensor([-1.0, 0.0]), torch.tensor([0.5, 0.25])
    x = torch.tensor(
        [
            [float("inf"), float("-inf"), float("nan"), 1e38, -1e38, 0.0],
            [float("nan"), float("inf"), float("-inf"), 0.1, 1e-30, -0.0],
        ]
    ).view(1, 2, 6)
    p = tritonact.quantize(x, bits, lo, step, backend="torch")
    q = packed_codes(p)[0]
    top = 2**bits - 1
    assert q[0].tolist() == [top, 0, NAN_CODE, top, 0, 2 if bits > 1 else 1]
    assert q[1].tolist() == [NAN_CODE, top, 0, 0, 0, 0]


def test_pack_unpack_roundtrip_every_width():
    g = torch.Generator().manual_seed(1)
    for bits in BITS:
        for n in (1, 7, 8, 9, 63):
            q = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
            data = pack_codes(q, bits)
            assert data.numel() == math.ceil(n * bits / 8)
            torch.testing.assert_close(unpack_codes(data, bits, n), q, rtol=0, atol=0)


def test_nbytes_and_attributes():
    x, lo, step = make((2, 3, 4, 5))
    p = tritonact.quantize(x, 4, lo, step)
    assert p.bits == 4 and p.shape == x.shape and p.dtype == x.dtype and p.device == x.device
    assert p.nbytes == 60 + 2 * 3 * 4
    assert "bits=4" in repr(p)


def test_non_dense_view_is_handled():
    x, lo, step = make((2, 3, 8, 8))
    view = x[:, :, ::2, 1::3]
    p = tritonact.quantize(view, 4, lo, step)
    torch.testing.assert_close(packed_codes(p), formula_codes(view, 4, lo, step), rtol=0, atol=0)


# ---- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 3, 16, 4.0, True, "4"])
def test_bad_bits(bits):
    x, lo, step = make((1, 2, 3))
    with pytest.raises(ValueError, match=f"got {bits!r}"):
        tritonact.quantize(x, bits, lo, step)


@pytest.mark.parametrize(
    "lo,step,exc,msg",
    [
        (torch.zeros(3), torch.ones(2), ValueError, r"shape \(2,\).*got \(3,\)"),
        (torch.zeros(2), torch.ones(2, 1), ValueError, r"got \(2, 1\)"),
        (torch.zeros(2, dtype=torch.float64), torch.ones(2), TypeError, "float64"),
        (torch.zeros(2), torch.tensor([1.0, 0.0]), ValueError, "step must be > 0.*got 0.0"),
        (torch.zeros(2), torch.tensor([1.0, -2.0]), ValueError, "got -2.0"),
        (torch.zeros(2), torch.tensor([1.0, float("inf")]), ValueError, "finite, got inf"),
        (torch.tensor([float("nan"), 0.0]), torch.ones(2), ValueError, "lo must be finite, got nan"),
        ([0.0, 0.0], torch.ones(2), TypeError, "list"),
    ],
)
def test_bad_grid(lo, step, exc, msg):
    x = torch.randn(1, 2, 3)
    with pytest.raises(exc, match=msg):
        tritonact.quantize(x, 4, lo, step)


@pytest.mark.parametrize(
    "x,exc,msg",
    [
        (torch.arange(6).view(1, 2, 3), TypeError, "int64"),
        (torch.randn(1, 2, 3, dtype=torch.complex64), TypeError, "complex64"),
        (torch.randn(2), ValueError, r"at least 2 dims.*\(2,\)"),
        (torch.randn(1, 2, 3, dtype=torch.float64), TypeError, "float64"),
        ([[1.0]], TypeError, "list"),
    ],
)
def test_bad_input_tensor(x, exc, msg):
    with pytest.raises(exc, match=msg):
        tritonact.quantize(x, 4, torch.zeros(2), torch.ones(2))


def test_bad_backend_name():
    with pytest.raises(ValueError, match="'cuda'"):
        tritonact.quantize(torch.randn(1, 2, 3), 4, torch.zeros(2), torch.ones(2), backend="cuda")


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tritonact.quantize(torch.randn(1, 2, 3), 4, torch.zeros(2), torch.ones(2), backend="triton")


def test_dequantize_rejects_other_types():
    with pytest.raises(TypeError, match="Tensor"):
        tritonact.dequantize(torch.zeros(3))
