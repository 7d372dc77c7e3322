"""Ops that consume a unit's code: ``tritonact::conv2d`` (saves its input's code, not its input),
``tritonact::max_pool2d`` (saves a window-local argmax, 4 bits for a 3x3 window, 2 for a 2x2) and
``tritonact::decode`` (a code back to the activation, for a weight gradient).

A code crosses an op boundary as tensors and primitives: ``data`` (packed codes), ``P`` (the per-channel grid),
``local`` (a max-pool's argmax, or None), the unit output's ``shape`` and memory order ``perm``, ``bits``, the
unit's ``act`` and the pool's geometry ``pool`` (kernel, stride, padding, dilation, output height and width: 10
ints, empty for none). ``local`` is kept as ``pool_index.pack_local`` packs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tritonact import backends, escapes, pool_index
from tritonact import reference as ref
from tritonact.ops.bn_act import DOUBLE_BACKWARD, direct
from tritonact.saved import own

__all__ = ["conv2d", "decode", "max_pool2d", "max_pool2d_backward", "pool_with_indices", "ConvFn", "MaxPoolFn"]


def _no_double_backward():
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(DOUBLE_BACKWARD)


# ----------------------------------------------------------------------------------------------------------
# decode


def _decode(
    data: Tensor,
    P: Tensor,
    local: Tensor | None,
    shape: list[int],
    perm: list[int],
    bits: int,
    act: str,
    pool: list[int],
    dtype: torch.dtype,
    backend: str,
    esc: Tensor | None = None,
) -> Tensor:
    """``a~`` in ``dtype``: the unit's activation decoded (dense in ``perm``), or for a max-pool code, gathered at
    the stored argmax (the pool output's shape, contiguous). ``esc``: the code's escaped values."""
    code = backends.CodeRef(data, P, local, tuple(shape), tuple(perm), bits, act, tuple(pool), esc)
    return backends.get(backend).decode(code, dtype)


decode = torch.library.custom_op("tritonact::decode", _decode, mutates_args=())


@decode.register_fake
def _(data, P, local, shape, perm, bits, act, pool, dtype, backend, esc=None):
    if local is not None:
        return local.new_empty(pool_shape(shape, pool), dtype=dtype)
    return ref.empty_in(shape, perm, dtype, data.device)


def pool_shape(shape, pool) -> list[int]:
    """The logical shape of a max-pool output whose input has ``shape``, from its geometry ``pool``."""
    return [shape[0], shape[1], pool[8], pool[9]]


# ----------------------------------------------------------------------------------------------------------
# convolution


def _conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    data: Tensor,
    P: Tensor,
    local: Tensor | None,
    code_shape: list[int],
    code_perm: list[int],
    bits: int,
    act: str,
    pool: list[int],
    backend: str,
    esc: Tensor | None = None,
) -> Tensor:
    """``F.conv2d(x, weight, bias, ...)``, exactly; its autograd formula keeps ``weight`` and ``x``'s code
    (``data``, ``P``, ``local``...) instead of ``x``, and computes the weight gradient from the decoded code."""
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


conv2d = torch.library.custom_op("tritonact::conv2d", _conv2d, mutates_args=())


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, *_code):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, data, P, local, code_shape, code_perm, bits, act, pool, be = (
        inputs[:16]
    )
    esc = inputs[16] if len(inputs) > 16 else None
    own(P, esc)  # the code's grid and escapes are tritonact's own (a grid with a table would look codable)
    ctx.has_esc = esc is not None
    ctx.save_for_backward(weight, data, P, *([esc] if esc is not None else []), *([local] if local is not None else []))
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.code = (list(code_shape), list(code_perm), bits, act, list(pool), be)
    ctx.dtype, ctx.x_dtype = output.dtype, x.dtype
    ctx.bias_sizes = [bias.shape[0]] if bias is not None else None
    ctx.set_materialize_grads(False)


def _conv_backward(ctx, g, into: Tensor | None = None):
    """The conv's gradients. ``into``: a gradient of its input from its other readers, which nothing else holds, in
    the input's dtype (``tritonact.ops.fork.ConvFork``); the input gradient is added into it a few samples at a time
    and ``into`` is returned as the input gradient."""
    if g is None:
        return (into, *(None,) * 16)
    _no_double_backward()
    weight, data, P, *loc = ctx.saved_tensors
    esc = loc.pop(0) if ctx.has_esc else None
    local = loc[0] if loc else None
    code_shape, code_perm, bits, act, pool, be = ctx.code
    dt, w = ctx.dtype, weight.to(ctx.dtype)
    stride, padding, dilation, groups = ctx.conv
    need = ctx.needs_input_grad
    want_b = ctx.bias_sizes is not None and need[2]

    def backward(g, x, mask):
        if gemm:  # (a strided 1x1 convolution reads the input at its output's positions only)
            gi = input_grad(g) if mask[0] else None
            gw = None
            if mask[1]:  # (in the weight's strides: a channels_last 1x1 weight differs in its size-1 dims)
                gw = _gemm_weight_grad(g, x[:, :, :: stride[0], :: stride[1]]).as_strided(w.shape, w.stride())
            return gi, gw, g.sum((0, 2, 3)) if mask[2] else None
        return torch.ops.aten.convolution_backward(
            g, x, w, ctx.bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask
        )

    def input_grad(g):  # needs no input: the transposed convolution (convolution_backward would copy a placeholder)
        if pointwise:
            return pointwise_input_grad(g, w, stride, x_shape[1:], w_t)
        least = [(g.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (w.shape[2 + i] - 1) + 1
                 for i in (0, 1)]  # fmt: skip
        pad = [x_shape[2 + i] - least[i] for i in (0, 1)]
        return F.conv_transpose2d(g, w, None, stride, padding, pad, groups, dilation)

    def add_input_grad(dst, g):  # dst += g's input gradient (a strided 1x1 convolution's: where it read, no zeros)
        if pointwise and list(stride) != [1, 1]:
            dst[:, :, :: stride[0], :: stride[1]].add_(pointwise_input_grad(g, w, [1, 1], None, w_t))
            return dst
        return dst.add_(input_grad(g))

    x_shape = pool_shape(code_shape, pool) if local is not None else code_shape
    pointwise = tuple(w.shape[2:]) == (1, 1) and list(padding) == [0, 0] and groups == 1
    # (strided: NCHW gradients, CPU only: measured there, the GPU keeps conv_transpose2d until it is measured)
    pointwise = pointwise and (list(stride) == [1, 1] or (g.is_contiguous() and g.device.type == "cpu"))
    gemm = pointwise and _by_gemm(g, w)
    w_t = w.transpose(0, 1).contiguous() if pointwise and not gemm else None  # (once, not in every chunk's call)
    decode_op = _decode if direct() else torch.ops.tritonact.decode
    be = backends.effective(be)
    chunks = list(ref.sample_chunks(code_shape, code_perm, bits))
    g = g.to(dt)
    gi = gw = gb = None
    if len(chunks) == 1:
        a = decode_op(data, P, local, code_shape, code_perm, bits, act, pool, dt, be, esc)
        if need[0] and (need[1] or want_b):  # the decoded input is gone before the input gradient is made
            _, gw, gb = backward(g, a, [False, need[1], want_b])
            del a
            gi = add_input_grad(into, g) if into is not None else input_grad(g)
        else:
            gi, gw, gb = backward(g, a, [need[0], need[1], want_b])
            del a
            if into is not None:
                gi = into.add_(gi)
    else:  # the decoded input lives a few samples at a time: the weight gradient is summed over sample chunks
        for n0, n1, b0, b1 in chunks if need[1] or want_b or into is not None else ():
            if need[1] or want_b:
                sub = [n1 - n0, *code_shape[1:]]
                part = local[n0:n1] if local is not None else None
                e = escapes.select(esc, n0, n1, code_shape, code_perm)
                a = decode_op(data[b0:b1], P, part, sub, code_perm, bits, act, pool, dt, be, e)
                _, gw_c, gb_c = backward(g[n0:n1], a, [False, need[1], want_b])
                del a
                gw = gw_c if gw is None else gw.add_(gw_c)
                gb = gb_c if gb is None else gb.add_(gb_c)
            if into is not None:
                add_input_grad(into[n0:n1], g[n0:n1])
        gi = into if into is not None else input_grad(g) if need[0] else None
    return (
        gi.to(ctx.x_dtype) if gi is not None else None,
        gw.to(weight.dtype) if gw is not None else None,
        gb if want_b else None,
        *([None] * 14),
    )


conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)

# A 1x1 convolution's gradients over planes of at most this many positions are one matrix product over the whole
# batch: PyTorch's CPU convolution multiplies sample by sample, reading the whole weight for each few columns.
# Input and weight gradient of resnet50's 1x1 convolutions at 8 x 64x64, one thread, medians
# (perf/bench_kernels.py -k pointwise): 2x2 planes (2048 -> 512 channels) 2.67 ms against convolution_backward's
# 31.6, 4x4 1.58 against 3.05, 8x8 1.52 against 1.83, 16x16 2.11 against 1.97.
SMALL_PLANE = 64


def pointwise_input_grad(g: Tensor, w: Tensor, stride, x_chw, w_t: Tensor | None = None) -> Tensor:
    """The input gradient of a 1x1 convolution without padding (input ``(N, *x_chw)``; strided: ``g`` NCHW):
    ``W^T g`` by one matrix product over the batch (:data:`SMALL_PLANE`) or as a convolution by ``W^T``
    (``w_t``: ``W^T`` made contiguous once; on the CPU ``conv_transpose2d`` takes a slow path for 1x1 convolutions,
    5.0 ms a call at resnet50 8 x 64x64 against 2.5). Strided: ``W^T g`` at the positions the convolution read,
    zeros elsewhere (``conv_transpose2d``: 47.5 ms against 14.5 for resnet50's layer2 downsample at 16 x 128x128,
    perf/bench_kernels.py -k strided)."""
    if _by_gemm(g, w):
        gi = _gemm_input_grad(g, w).contiguous()
    else:
        gi = F.conv2d(g, w_t if w_t is not None else w.transpose(0, 1).contiguous())
    if list(stride) == [1, 1]:
        return gi
    full = g.new_zeros([g.shape[0], *x_chw])
    full[:, :, :: stride[0], :: stride[1]] = gi
    return full


def _by_gemm(g: Tensor, w: Tensor) -> bool:
    """Whether a 1x1 convolution's gradients are one matrix product (CPU only: measured there)."""
    small = g.dim() == 4 and g.shape[2] * g.shape[3] <= SMALL_PLANE
    return small and g.device.type == "cpu" and g.is_contiguous() and w.is_contiguous()


def _gemm_input_grad(g: Tensor, w: Tensor) -> Tensor:
    """A 1x1 convolution's input gradient ``W^T g`` as one matrix product (an NCHW view, not contiguous)."""
    N, Co, H, W = g.shape
    return (w.view(Co, -1).t() @ g.transpose(0, 1).reshape(Co, -1)).view(-1, N, H, W).transpose(0, 1)


def _gemm_weight_grad(g: Tensor, x: Tensor) -> Tensor:
    """A 1x1 convolution's weight gradient ``g x^T`` summed over the batch and positions, one matrix product."""
    Co, Ci = g.shape[1], x.shape[1]
    return (g.transpose(0, 1).reshape(Co, -1) @ x.transpose(0, 1).reshape(Ci, -1).t()).view(Co, Ci, 1, 1)


class ConvFn(torch.autograd.Function):
    """``tritonact::conv2d`` run directly (see ``tritonact.ops.bn_act.direct``)."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _conv2d(*inputs)
        _conv_setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, g):
        return _conv_backward(ctx, g)


# ----------------------------------------------------------------------------------------------------------
# max-pool


def _max_pool2d(
    x: Tensor,
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(F.max_pool2d(x, ...), local)``: the exact output and the window-local position of each maximum, which is
    all its backward keeps: uint8, the output's layout, 2 or 4 bits per position along the last dim where a window
    has at most 4 or 16 positions (``pool_index.pack_local``)."""
    out, idx = pool_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
    local = backends.get(backend).pool_index("local", idx, tuple(x.shape), kernel, stride, padding, dilation)
    kept = pool_index.pack_local(local, kernel)  # (a new tensor, unless a byte per position is kept)
    if kept is local and local.stride() != idx.stride():
        kept = torch.empty_like(idx, dtype=torch.uint8).copy_(local)
    return out, kept


def pool_with_indices(x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool) -> tuple[Tensor, Tensor]:
    """``F.max_pool2d(x, ..., return_indices=True)``, the same output and indices bit for bit (the same window scan
    and comparison in both kernels; tested with ties, NaN and padding). An NCHW fp32 CPU input of 16 channels or
    more is pooled through a channels_last copy: ATen's NCHW kernel runs element by element. One thread, with both
    copies: resnet50's stem pool at 16 x 64x64x64 17.5 ms against 31.1, GoogLeNet's 3x3 pool at (4, 192, 28, 28)
    0.65 against 4.5; at 3 channels 0.61 against 0.44, so below 16 the NCHW kernel runs."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] >= 16 and x.is_contiguous():
        cl = x.contiguous(memory_format=torch.channels_last)
        out, idx = F.max_pool2d(cl, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
        return out.contiguous(), idx.contiguous()
    return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)


max_pool2d = torch.library.custom_op("tritonact::max_pool2d", _max_pool2d, mutates_args=())


@max_pool2d.register_fake
def _(x, kernel, stride, padding, dilation, ceil_mode, backend):
    out, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
    return out, pool_index.pack_local(torch.empty_like(idx, dtype=torch.uint8), kernel)


def _pool_setup(ctx, inputs, output):
    x, kernel, stride, padding, dilation, _ceil, backend = inputs
    ctx.save_for_backward(output[1])
    ctx.args = (list(x.shape), list(kernel), list(stride), list(padding), list(dilation))
    ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    ctx.backend = backend
    ctx.set_materialize_grads(False)


def _pool_backward(ctx, g, _g_local):
    if g is None:
        return (None,) * 7
    _no_double_backward()
    (local,) = ctx.saved_tensors
    run = _max_pool2d_backward if direct() else torch.ops.tritonact.max_pool2d_backward
    gi = run(g, local, *ctx.args, ctx.channels_last, backends.effective(ctx.backend))
    return (gi,) + (None,) * 6


max_pool2d.register_autograd(_pool_backward, setup_context=_pool_setup)


class MaxPoolFn(torch.autograd.Function):
    """``tritonact::max_pool2d`` run directly (see ``tritonact.ops.bn_act.direct``)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, local = _max_pool2d(*inputs)
        _pool_setup(ctx, inputs, (out, local))
        ctx.mark_non_differentiable(local)
        return out, local

    @staticmethod
    def backward(ctx, g, g_local):
        return _pool_backward(ctx, g, g_local)


def _max_pool2d_backward(
    g: Tensor,
    local: Tensor,
    in_shape: list[int],
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    channels_last: bool,
    backend: str,
) -> Tensor:
    """The max-pool's input gradient: ``g`` scattered to the stored argmax positions (``local`` as
    ``pool_index.pack_local`` keeps it)."""
    N, C, H, W = in_shape
    be = backends.get(backend)
    gi = torch.zeros(N, C, H * W, dtype=g.dtype, device=g.device)
    for n0, n1 in ref.batch_ranges(N, C * g.shape[-1] * g.shape[-2]):  # int64 indices a few at a time
        part = pool_index.unpack_local(local[n0:n1], kernel, g.shape[-1])
        idx = be.pool_index("global", part, (n1 - n0, C, H, W), kernel, stride, padding, dilation)
        gi[n0:n1].scatter_add_(2, idx.reshape(n1 - n0, C, -1), g[n0:n1].reshape(n1 - n0, C, -1))
    gi = gi.view(N, C, H, W)
    return gi.contiguous(memory_format=torch.channels_last) if channels_last else gi


max_pool2d_backward = torch.library.custom_op("tritonact::max_pool2d_backward", _max_pool2d_backward, mutates_args=())


@max_pool2d_backward.register_fake
def _(g, local, in_shape, kernel, stride, padding, dilation, channels_last, backend):
    gi = g.new_empty(in_shape)
    return gi.contiguous(memory_format=torch.channels_last) if channels_last else gi
