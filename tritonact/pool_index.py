"""Max-pool index maps: the window-local argmax a pool keeps instead of its input, and back (the torch reference;
``tritonact.reference`` re-exports them), and its storage: 2 bits per position where a window has at most 4
positions, 4 bits where it has at most 16 (a 3x3 pool's argmax; a byte per position held 64 KiB per 128x128
sample in resnet50, as much as its largest 2-bit codes), else a byte."""

from __future__ import annotations

import torch


def index_dtype(in_shape) -> torch.dtype:
    """Float dtype in which the index arithmetic below is exact: fp32 while a plane has at most 2**20 positions
    (indices, and the rounding margin of ``floor((i + 0.5) / W)``, stay far inside fp32's 24-bit mantissa), else
    fp64. Float arithmetic, because integer division does not vectorize on CPU: 4x faster eager, 11x compiled."""
    return torch.float32 if in_shape[2] * in_shape[3] <= 1 << 20 else torch.float64


def window_origins(OH: int, OW: int, stride, padding, device, dtype):
    """Top-left input coordinates ``(h0 (OH, 1), w0 (1, OW))`` of each max-pool window."""
    h0 = (torch.arange(OH, device=device, dtype=dtype) * stride[0] - padding[0]).view(OH, 1)
    w0 = (torch.arange(OW, device=device, dtype=dtype) * stride[1] - padding[1]).view(1, OW)
    return h0, w0


def global_index(local, in_shape, kernel, stride, padding, dilation, dtype=None):
    """Flat ``H * W`` input index (int64) of each window-local argmax (``local``: uint8, the pool's output shape).
    ``dtype``: that of the arithmetic (:func:`index_dtype` of ``in_shape`` unless given)."""
    dtype = dtype or index_dtype(in_shape)
    W = in_shape[3]
    h0, w0 = window_origins(*local.shape[-2:], stride, padding, local.device, dtype)
    loc = local.to(dtype)
    kh = torch.floor((loc + 0.5) / kernel[1])
    kw = loc - kh * kernel[1]
    return ((h0 + kh * dilation[0]) * W + (w0 + kw * dilation[1])).long()


def local_index(idx, in_shape, kernel, stride, padding, dilation, dtype=None):
    """Inverse of :func:`global_index`: the window-local position (uint8) of a flat ``H * W`` argmax."""
    dtype = dtype or index_dtype(in_shape)
    W = in_shape[3]
    h0, w0 = window_origins(*idx.shape[-2:], stride, padding, idx.device, dtype)
    t = idx.to(dtype)
    ih = torch.floor((t + 0.5) / W)
    kh = torch.floor((ih - h0 + 0.5) / dilation[0])
    kw = torch.floor((t - ih * W - w0 + 0.5) / dilation[1])
    return (kh * kernel[1] + kw).to(torch.uint8)


def local_bits(kernel) -> int:
    """Bits per window-local argmax position as it is kept (:func:`pack_local`): 2 for a window of at most 4
    positions, 4 for at most 16, else 8."""
    n = kernel[0] * kernel[1]
    return 2 if n <= 4 else 4 if n <= 16 else 8


def pack_local(local: torch.Tensor, kernel) -> torch.Tensor:
    """``local`` (uint8, ``(N, C, OH, OW)``) as it is kept: ``8 // b`` positions per byte along the last dim
    (``b = local_bits(kernel)``), the first in the lowest bits (``(N, C, OH, ceil(OW * b / 8))``, the width padded
    with zeros); at 8 bits ``local`` itself."""
    b = local_bits(kernel)
    if b == 8:
        return local
    k = 8 // b
    if local.shape[-1] % k:
        local = torch.nn.functional.pad(local, (0, k - local.shape[-1] % k))
    out = local[..., 0::k].clone()
    for j in range(1, k):
        out |= local[..., j::k] << (b * j)
    return out


def unpack_local(kept: torch.Tensor, kernel, ow: int) -> torch.Tensor:
    """Inverse of :func:`pack_local`: the window-local argmax (uint8, last dim ``ow``)."""
    b = local_bits(kernel)
    if b == 8:
        return kept
    k = 8 // b
    out = kept.new_empty((*kept.shape[:-1], k * kept.shape[-1]))
    for j in range(k):
        torch.bitwise_and(kept >> (b * j), (1 << b) - 1, out=out[..., j::k])
    return out[..., :ow]
