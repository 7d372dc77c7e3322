"""Per-channel k-bit quantize / dequantize kernels (contract: ``tritonact.quant``).

Each program owns ``BLOCK`` output bytes, i.e. ``BLOCK * (8 // BITS)`` consecutive elements in memory order, so
loads and stores are contiguous whatever the memory format; the channel of element ``i`` is
``(i // inner) % C``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tritonact.kernels._config import launch_config


@triton.jit
def _round_to_bf16(v):
    # Round-to-nearest-even to bf16 precision in fp32 bits, so the final cast is exact on every backend
    # (the interpreter's fp32 -> bf16 cast truncates; torch and the GPU round). v is finite here.
    b = v.to(tl.uint32, bitcast=True)
    b = (b + (((b >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _quantize_fwd_kernel(
    out_ptr, x_ptr, lo_ptr, rstep_ptr, numel, nbytes, inner, C, BITS: tl.constexpr, BLOCK: tl.constexpr
):
    PER: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    j = tl.arange(0, PER)
    idx = byte[:, None] * PER + j[None, :]
    m = idx < numel
    c = (idx // inner) % C
    x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
    lo = tl.load(lo_ptr + c, mask=m, other=0.0)
    r = tl.load(rstep_ptr + c, mask=m, other=1.0)
    t = (x - lo) * r
    q = tl.minimum(tl.maximum(tl.floor(t), 0.0), LEVELS * 1.0)
    q = tl.where((t != t) | (~m), 0.0, q)  # NaN -> code 0 (NAN_CODE); padding -> 0
    packed = tl.sum(q.to(tl.int32) << (j[None, :] * BITS), axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < nbytes)


@triton.jit
def _dequantize_fwd_kernel(
    out_ptr, data_ptr, lo_ptr, step_ptr, numel, nbytes, inner, C, BITS: tl.constexpr, BLOCK: tl.constexpr
):
    PER: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    b = tl.load(data_ptr + byte, mask=byte < nbytes, other=0).to(tl.int32)
    j = tl.arange(0, PER)
    q = (b[:, None] >> (j[None, :] * BITS)) & MASK
    idx = byte[:, None] * PER + j[None, :]
    m = idx < numel
    c = (idx // inner) % C
    lo = tl.load(lo_ptr + c, mask=m, other=0.0)
    step = tl.load(step_ptr + c, mask=m, other=0.0)
    v = lo + (q.to(tl.float32) + 0.5) * step
    if out_ptr.dtype.element_ty == tl.bfloat16:
        v = _round_to_bf16(v)
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=m)


def _grid(nbytes: int, block: int):
    return (triton.cdiv(max(nbytes, 1), block),)


def quantize_forward(x: torch.Tensor, lo: torch.Tensor, rstep: torch.Tensor, bits: int, inner: int) -> torch.Tensor:
    """Codes of ``x`` (dense in memory order) as ``ceil(numel * bits / 8)`` uint8 bytes."""
    numel = x.numel()
    nbytes = (numel * bits + 7) // 8
    out = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    if nbytes == 0:
        return out
    cfg = launch_config("quantize", bits=bits, numel=numel)
    _quantize_fwd_kernel[_grid(nbytes, cfg["BLOCK"])](
        out,
        x,
        lo,
        rstep,
        numel,
        nbytes,
        inner,
        x.shape[1],
        BITS=bits,
        BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"],
        enable_fp_fusion=False,
    )
    return out


def dequantize_forward(
    out: torch.Tensor, data: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int, inner: int
) -> torch.Tensor:
    """Decode ``data`` into ``out`` (dense, in memory order; its dtype is the decoded dtype)."""
    numel = out.numel()
    nbytes = data.numel()
    if numel == 0:
        return out
    cfg = launch_config("dequantize", bits=bits, numel=numel)
    C = lo.numel()
    _dequantize_fwd_kernel[_grid(nbytes, cfg["BLOCK"])](
        out,
        data,
        lo,
        step,
        numel,
        nbytes,
        inner,
        C,
        BITS=bits,
        BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"],
        enable_fp_fusion=False,  # lo + (q + 0.5) * step rounded op by op, like torch (no FMA on the GPU)
    )
    return out
