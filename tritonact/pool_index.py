"""Max-pool index maps: the window-local argmax (uint8) a pool keeps instead of its input, and back (the torch
reference; ``tritonact.reference`` re-exports them)."""

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
