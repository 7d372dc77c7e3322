"""Per-channel k-bit quantizer: ``quantize`` / ``dequantize`` and the ``PackedTensor`` they exchange.

Contract (docs/quantization.md): for element ``x`` of channel ``c`` (dim 1)::

    r_c  = 1 / step_c                                   (fp32, computed once per channel)
    q    = clamp(floor((float32(x) - lo_c) * r_c), 0, 2**bits - 1)     NaN -> code 0
    x~   = dtype(lo_c + (q + 0.5) * step_c)              (fp32 arithmetic, cast to x's dtype)

Codes are stored in the memory order of ``x`` (so channels_last stays channels_last without a copy), packed
``8 // bits`` to a byte, first element in the least significant bits.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

__all__ = ["PackedTensor", "quantize", "dequantize", "VALID_BITS", "NAN_CODE"]

VALID_BITS = (1, 2, 4, 8)
NAN_CODE = 0
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def memory_order(x: torch.Tensor) -> tuple[int, ...]:
    """Dims of ``x`` from outermost to innermost in memory (a permutation ``p`` with ``x.permute(p)`` dense)."""
    strides = x.stride()
    if torch.compiler.is_compiling() or not all(type(s) is int for s in strides):  # a trace: not cached
        return _order.__wrapped__(tuple(strides))
    return _order(strides)


@functools.lru_cache(maxsize=1024)
def _order(strides: tuple[int, ...]) -> tuple[int, ...]:
    # Stable sort on (-stride, dim) keeps size-1 dims in their logical place, which is what
    # torch's own memory-format inference does for NCHW / NHWC tensors.
    return tuple(sorted(range(len(strides)), key=lambda d: (-strides[d], d)))


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


@dataclass(frozen=True, eq=False)
class PackedTensor:
    """k-bit codes of a tensor plus the per-channel grid that decodes them.

    Attributes:
        data: ``uint8`` tensor of ``ceil(numel * bits / 8)`` bytes, codes in ``perm`` (memory) order.
        lo: ``(C,)`` fp32, lower edge of each channel's grid.
        step: ``(C,)`` fp32, bin width of each channel's grid.
        bits: code width, one of 1, 2, 4, 8.
        shape: logical shape of the original tensor.
        dtype: dtype of the original tensor (and of ``dequantize``'s result).
        perm: memory order of the original tensor's dims, outermost first.
    """

    data: torch.Tensor
    lo: torch.Tensor
    step: torch.Tensor
    bits: int
    shape: torch.Size
    dtype: torch.dtype
    perm: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed codes plus the per-channel fp32 metadata."""
        return self.data.numel() + 4 * (self.lo.numel() + self.step.numel())

    @property
    def channels(self) -> int:
        return self.shape[1]

    def layout(self) -> tuple[int, int]:
        """``(inner, C)``: element ``i`` in memory order belongs to channel ``(i // inner) % C``."""
        pos = self.perm.index(1)
        inner = math.prod(self.shape[d] for d in self.perm[pos + 1 :])
        return inner, self.shape[1]

    def dequantize(self, *, backend: str | None = None) -> torch.Tensor:
        return dequantize(self, backend=backend)

    def __repr__(self) -> str:
        return (
            f"PackedTensor(shape={tuple(self.shape)}, bits={self.bits}, dtype={self.dtype}, "
            f"device={self.device}, nbytes={self.nbytes})"
        )


# ----------------------------------------------------------------------------------------------------------
# validation and backend choice


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    return bits


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (channels are dim 1), got shape {tuple(x.shape)}")


def _check_grid(name: str, t, x: torch.Tensor, positive: bool) -> None:
    C = x.shape[1]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({C},), got {type(t).__name__}")
    if tuple(t.shape) != (C,):
        raise ValueError(f"{name} must have shape ({C},) (one value per channel), got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)][0].item()
        raise ValueError(f"{name} must be finite, got {bad}")
    if positive and not bool((t > 0).all()):
        bad = t[t <= 0][0].item()
        raise ValueError(f"{name} must be > 0 in every channel, got {bad}")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``; raises a clear error where Triton cannot run."""
    if backend is None:
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not importable here")
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"backend='triton' on a {device.type} tensor runs only under Triton's interpreter: set "
                "TRITON_INTERPRET=1 before tritonact is imported, or use backend='torch'"
            )
    return backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# torch reference (the CPU path)


def _channel_view_shape(x_perm_shape, perm) -> list[int]:
    shape = [1] * len(perm)
    pos = perm.index(1)
    shape[pos] = x_perm_shape[pos]
    return shape


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat uint8 tensor of codes (each < 2**bits) into ``ceil(n * bits / 8)`` bytes, LSB first."""
    per = 8 // bits
    q = q.reshape(-1)
    if per == 1:
        return q
    n = q.numel()
    pad = (-n) % per
    if pad:
        q = torch.cat([q, q.new_zeros(pad)])
    q = q.view(-1, per)
    out = q[:, 0].clone()
    for j in range(1, per):  # uint8 shifts and ors: no wider temporaries
        out.bitwise_or_(q[:, j] << (j * bits))
    return out


def unpack_codes(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes as a flat uint8 tensor."""
    per = 8 // bits
    if per == 1:
        return data[:n]
    mask = (1 << bits) - 1
    out = torch.empty(data.numel(), per, dtype=torch.uint8, device=data.device)
    for j in range(per):
        torch.bitwise_and(data >> (j * bits) if j else data, mask, out=out[:, j])
    return out.view(-1)[:n]


def _quantize_torch(x, bits, lo, rstep, perm) -> torch.Tensor:
    xp = x.permute(perm)
    shape_b = _channel_view_shape(xp.shape, perm)
    # the contract's ops in order, in place on one fp32 temporary
    t = torch.sub(xp, lo.view(shape_b)) if xp.dtype == torch.float32 else xp.float().sub_(lo.view(shape_b))
    t.mul_(rstep.view(shape_b)).floor_().clamp_(0, (1 << bits) - 1).nan_to_num_(nan=float(NAN_CODE))
    return pack_codes(t.to(torch.uint8), bits)


def _dequantize_torch(p: PackedTensor) -> torch.Tensor:
    perm_shape = [p.shape[d] for d in p.perm]
    q = unpack_codes(p.data, p.bits, p.numel).view(perm_shape)
    shape_b = _channel_view_shape(perm_shape, p.perm)
    v = q.float().add_(0.5).mul_(p.step.view(shape_b)).add_(p.lo.view(shape_b))  # lo + (q + 0.5) * step
    return v.to(p.dtype).permute(_inverse(p.perm))


# ----------------------------------------------------------------------------------------------------------
# public API


def quantize(
    x: torch.Tensor, bits: int, lo: torch.Tensor, step: torch.Tensor, *, backend: str | None = None
) -> PackedTensor:
    """Encode ``x`` per channel on the uniform grid ``lo + step * [0, 2**bits)``.

    Args:
        x: ``(N, C, ...)`` float32/float16/bfloat16 tensor, 2-D to 5-D, any dense memory format
            (NCHW, channels_last, ...). A non-dense view is copied once to contiguous.
        bits: 1, 2, 4 or 8.
        lo: ``(C,)`` float32, finite: lower edge of each channel's grid.
        step: ``(C,)`` float32, finite, > 0: bin width of each channel's grid.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton for CUDA tensors, torch otherwise).

    Returns:
        A :class:`PackedTensor`. ``+inf``/``-inf`` clamp to the end codes, NaN gets code ``NAN_CODE`` (0).
    """
    bits = _check_bits(bits)
    _check_input(x)
    _check_grid("lo", lo, x, positive=False)
    _check_grid("step", step, x, positive=True)
    backend = resolve_backend(backend, x.device)
    return _quantize_unchecked(x, bits, lo, step, backend)


def _quantize_unchecked(x, bits, lo, step, backend) -> PackedTensor:
    perm = memory_order(x)
    if not x.permute(perm).is_contiguous():
        x = x.contiguous()  # overlapping or gapped view: the only case with a copy (documented)
        perm = tuple(range(x.dim()))
    rstep = 1.0 / step  # fp32 reciprocal, once per channel, shared by both backends
    if backend == "triton":
        from tritonact.kernels.quantize import quantize_forward

        pos = perm.index(1)
        inner = math.prod(x.shape[d] for d in perm[pos + 1 :])
        data = quantize_forward(x, lo, rstep, bits, inner)
    else:
        data = _quantize_torch(x, bits, lo, rstep, perm)
    return PackedTensor(data, lo, step, bits, x.shape, x.dtype, perm)


def dequantize(packed: PackedTensor, *, backend: str | None = None) -> torch.Tensor:
    """Decode ``packed`` to a tensor of its original shape, dtype, device and memory format."""
    if not isinstance(packed, PackedTensor):
        raise TypeError(f"dequantize expects a PackedTensor, got {type(packed).__name__}")
    backend = resolve_backend(backend, packed.device)
    if backend == "triton":
        from tritonact.kernels.quantize import dequantize_forward

        perm_shape = [packed.shape[d] for d in packed.perm]
        out = torch.empty(perm_shape, dtype=packed.dtype, device=packed.device)
        inner, _ = packed.layout()
        dequantize_forward(out, packed.data, packed.lo, packed.step, packed.bits, inner)
        return out.permute(_inverse(packed.perm))
    return _dequantize_torch(packed)


def edge_aligned_grid(lo, hi, e1, e2, L: float):
    """``(origin, step)`` of an ``L``-bin uniform grid that covers ``[lo, hi]`` and has bin edges at ``e1 < e2``
    where they lie inside it: both (an integer number of bins between them, at the cost of at most two bins of
    resolution), or one, or none (then the plain grid ``lo + k * (hi - lo) / L``). A value and its bin's decoded
    value are then always on the same side of each edge."""
    span = torch.clamp(hi - lo, min=1e-20)
    in1, in2 = (e1 > lo) & (e1 < hi), (e2 > lo) & (e2 < hi)
    gap = e2 - e1
    n = torch.floor((L - 2.0) * gap / span)
    both = in1 & in2 & (n >= 1)  # (n = 0: the edges closer than the span allows, align the first only)
    one_ = (in1 | in2) & ~both
    step = torch.where(both, gap / torch.clamp(n, min=1.0), torch.where(one_, span / (L - 1.0), span / L))
    step = torch.clamp(step, min=1e-20)
    e = torch.where(in1, e1, e2)
    aligned = e - torch.ceil((e - lo) / step) * step
    return torch.where(both | one_, aligned, lo), step
