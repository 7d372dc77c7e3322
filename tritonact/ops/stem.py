"""``tritonact::stem``: a convolution whose input is kept in full anyway, the BN + activation unit it feeds and the
max-pool that alone reads the unit's output (a ResNet's stem: conv1, bn1, relu, maxpool), as one op.

Its backward computes the convolution again from the kept input instead of keeping the unit's code: the BN's input
gradient is exact there, and what the op keeps is the convolution's input (which the convolution alone keeps
anyway), ``1/sigma``, the pool's window-local argmax and, for the pool output's readers, a code of the pool's
output: the unit's codes at the argmax positions. For a 3x3, stride-2 pool that is a quarter of the unit's code
(resnet50, 128x128, 2 bits: 16 KiB per sample instead of 64), and it decodes to the very values the unit's code
gathered at the argmax decodes to (a code is a function of its value, channel by channel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tritonact import backends, escapes, pool_index
from tritonact import reference as ref
from tritonact.ops.bn_act import DOUBLE_BACKWARD, _impl
from tritonact.ops.coded import _max_pool2d_backward, pool_with_indices
from tritonact.quant import _inverse, memory_order, pack_codes, unpack_codes
from tritonact.saved import own, passthrough

__all__ = ["stem", "pool_code", "conv_hw"]


def _stem(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    gamma: Tensor,
    beta: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    kernel: list[int],
    pool_stride: list[int],
    pool_padding: list[int],
    pool_dilation: list[int],
    ceil_mode: bool,
    bits: int,
    act: str,
    window: float,
    positive_fraction: float,
    backend: str,
    centroids: bool = False,
    edge: float = -1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, data, P, invstd, new_running_mean, new_running_var, local, esc)``: the pool's output (exact), its code
    (``data`` packed in ``out``'s memory order, grid ``P``, escaped values ``esc``), the BN's ``1/sigma``, its
    running statistics after this batch (empty where it has none) and the pool's argmax as
    ``pool_index.pack_local`` keeps it. The unit's arguments are ``tritonact::bn_act``'s."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if not y.permute(memory_order(y)).is_contiguous():
        y = y.contiguous()
    a, data, P, invstd, _, _, new_rm, new_rv, esc, _ = _impl(
        y, gamma, beta, None, running_mean, running_var, num_batches_tracked, momentum, eps, bits, act, window,
        positive_fraction, False, False, backend, "", centroids, edge,
    )  # fmt: skip
    del y
    pool = (kernel, pool_stride, pool_padding, pool_dilation)
    out, idx = pool_with_indices(a, *pool, ceil_mode)
    be = backends.get(backend)
    local = be.pool_index("local", idx, tuple(a.shape), *pool)
    kept = pool_index.pack_local(local, kernel)
    if kept is local:  # (a byte per position: an output of its own)
        kept = local.clone()
    pdata, pesc = pool_code(data, esc, idx, tuple(a.shape), memory_order(a), out, bits)
    return out, pdata, P, invstd, new_rm, new_rv, kept, pesc


def pool_code(data: Tensor, esc: Tensor, idx: Tensor, shape, perm, out: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``(data, esc)`` of a max-pool's output ``out`` from the code of its input (logical ``shape``, memory order
    ``perm``) and the pool's flat ``H * W`` argmax ``idx``: the input's codes (and escaped values) at the argmax,
    packed in ``out``'s memory order."""
    N, C, H, W = shape
    perm_shape = [shape[d] for d in perm]

    def logical(t):  # a flat tensor in the input's memory order -> (N, C, H * W)
        return t.view(perm_shape).permute(_inverse(perm)).reshape(N, C, H * W)

    q = logical(unpack_codes(data, bits, math.prod(shape)))
    flat = idx.reshape(N, C, -1)
    operm = memory_order(out)
    pq = torch.gather(q, 2, flat).view(out.shape)
    pdata = pack_codes(pq.permute(operm).contiguous(), bits)
    if escapes.count(esc) == 0:
        return pdata, escapes.none(out)
    at = esc[:, 0].long()
    value = torch.zeros(math.prod(shape), dtype=torch.float64, device=esc.device)
    present = torch.zeros(math.prod(shape), dtype=torch.bool, device=esc.device)
    value[at], present[at] = esc[:, 1], True
    pv = torch.gather(logical(value), 2, flat).view(out.shape)
    keep = torch.gather(logical(present), 2, flat).view(out.shape)
    where = torch.arange(out.numel(), device=esc.device).view([out.shape[d] for d in operm]).permute(_inverse(operm))
    return pdata, torch.stack([where[keep].double(), pv[keep]], dim=1)


stem = torch.library.custom_op("tritonact::stem", _stem, mutates_args=())


@stem.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, gamma, beta, running_mean, running_var, nbt, momentum, eps,
      kernel, pool_stride, pool_padding, pool_dilation, ceil_mode, bits, act, window, pf, backend, centroids=False,
      edge=-1.0):  # fmt: skip
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    out, idx = F.max_pool2d(y, kernel, pool_stride, pool_padding, pool_dilation, ceil_mode, return_indices=True)
    C, f32 = y.shape[1], torch.float32
    rows = ref.PARAM_ROWS + ((1 << bits) if centroids else 0)
    return (
        out,
        out.new_empty((out.numel() * bits + 7) // 8, dtype=torch.uint8),
        out.new_empty(rows, C, dtype=f32),
        out.new_empty(C, dtype=f32),
        torch.empty_like(running_mean) if running_mean is not None else out.new_empty(0, dtype=f32),
        torch.empty_like(running_var) if running_var is not None else out.new_empty(0, dtype=f32),
        pool_index.pack_local(torch.empty_like(idx, dtype=torch.uint8), kernel).clone(),
        out.new_empty(torch.library.get_ctx().new_dynamic_size(), 2, dtype=torch.float64),
    )


def _setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, gamma, beta = inputs[:9]
    kernel, pool_stride, pool_padding, pool_dilation, _ceil, _bits, act, _w, _pf, backend = inputs[14:24]
    out, _data, P, invstd, _rm, _rv, local, esc = output
    own(P, invstd, esc)
    with passthrough():  # the convolution's input, as a convolution keeps it
        ctx.save_for_backward(x, weight, bias, gamma, beta, invstd, local)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.pool = (list(kernel), list(pool_stride), list(pool_padding), list(pool_dilation))
    ctx.act, ctx.backend = act, backend
    ctx.y_shape = [out.shape[0], weight.shape[0], *conv_hw(x.shape, weight.shape[2:], stride, padding, dilation)]
    ctx.channels_last = out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    ctx.dtype = out.dtype
    ctx.set_materialize_grads(False)


def conv_hw(x_shape, kernel, stride, padding, dilation) -> list[int]:
    """The height and width of a convolution's output for an input of shape ``x_shape``."""
    return [(x_shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in (0, 1)]


def _backward(ctx, g, *_):
    """The convolution computed again (once), then the exact gradients of pool, activation, BN and convolution, a
    few samples at a time: besides ``g`` and the BN's normalized input, only a few samples' temporaries are alive
    (the unit's own backward from a code holds as much)."""
    n_in = 26
    if g is None:
        return (None,) * n_in
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(DOUBLE_BACKWARD)
    x, weight, bias, gamma, beta, invstd, local = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    dt = ctx.dtype
    w = weight.to(dt)
    xh = F.conv2d(x.to(dt), w, bias.to(dt) if bias is not None else None, stride, padding, dilation, groups)
    xh = xh.float() if xh.dtype != torch.float32 else xh
    dims = ref.channel_dims(xh)
    xh.sub_(ref.bview(xh.mean(dim=dims, dtype=torch.float64).float(), xh)).mul_(ref.bview(invstd, xh))
    run = _max_pool2d_backward if not _visible() else torch.ops.tritonact.max_pool2d_backward
    gm, bt = gamma.detach().float(), beta.detach().float()
    N, C = xh.shape[:2]
    be = backends.effective(ctx.backend)
    # the activation's test on the BN output gamma * xh + beta, as thresholds on xh: no float temporary
    lo, hi = _thresholds(gm, bt, ctx.act)
    # (one host sync a step; a trace's tensors (torch.compile's backward) have no values: the general test)
    flips = lo is not None and (type(gm) is not torch.Tensor or bool((gm < 0).any()))

    def g_z(n0, n1):  # dL/d(BN output) of samples [n0, n1): the pool's gradient through the activation
        gz = run(g[n0:n1], local[n0:n1], [n1 - n0, *ctx.y_shape[1:]], *ctx.pool, ctx.channels_last, be)
        gz = gz.float() if gz.dtype != torch.float32 else gz
        if lo is not None and flips:
            z = xh[n0:n1]
            passes = torch.gt(z, ref.bview(lo, z)).logical_xor_(ref.bview(gm < 0, z))
            if hi is not None:
                passes.logical_and_(torch.lt(z, ref.bview(hi, z)).logical_xor_(ref.bview(gm < 0, z)))
            gz.masked_fill_(passes.logical_not_(), 0.0)
        elif lo is not None:  # no negative gamma (the usual case): one comparison and a product, no float
            # temporary (a chunk of 64 x 64 x 64 at resnet50's stem, one thread: masked_fill_ with a broadcast bool
            # mask 0.64 ms, the product 0.18; the test above 1.24 ms in all)
            z = xh[n0:n1]
            passes = torch.gt(z, ref.bview(lo, z))
            if hi is not None:
                passes.logical_and_(torch.lt(z, ref.bview(hi, z)))
            gz.mul_(passes)
        return gz

    # a quarter of the CPU path's chunk: these temporaries come on top of the BN's whole normalized input
    chunks = ref.batch_ranges(N, xh[0].numel(), ref.CHUNK_ELEMENTS // 4)
    sum_gz = torch.zeros(C, dtype=torch.float32, device=xh.device)
    sum_gzxh = torch.zeros_like(sum_gz)
    for n0, n1 in chunks:
        gz = g_z(n0, n1)
        sum_gz += gz.sum(dim=dims)
        sum_gzxh += gz.mul_(xh[n0:n1]).sum(dim=dims)
        del gz
    M = N * xh[0, 0].numel()
    k, mean_gz, mean_gzxh = (ref.bview(v, xh) for v in (gm * invstd, sum_gz / M, -sum_gzxh / M))
    need = ctx.needs_input_grad
    mask = [need[0], need[1], bias is not None and need[2]]
    gx = torch.empty_like(x) if need[0] else None
    gw = gb = None
    for n0, n1 in chunks:
        # g_y = gamma * invstd * (g_z - mean(g_z) - xh * mean(g_z * xh))
        gy = g_z(n0, n1).sub_(mean_gz).addcmul_(xh[n0:n1], mean_gzxh).mul_(k)
        gx_c, gw_c, gb_c = torch.ops.aten.convolution_backward(
            gy.to(dt), x[n0:n1].to(dt), w, [w.shape[0]] if bias is not None else None, stride, padding, dilation,
            False, [0, 0], groups, mask,
        )  # fmt: skip
        del gy
        if gx is not None:
            gx[n0:n1] = gx_c
        gw = gw_c if gw is None or gw_c is None else gw.add_(gw_c)
        gb = gb_c if gb is None or gb_c is None else gb.add_(gb_c)
    return (
        gx,
        gw.to(weight.dtype) if need[1] else None,
        gb.to(bias.dtype) if mask[2] else None,
        *([None] * 4),
        sum_gzxh.to(gamma.dtype) if need[7] else None,
        sum_gz.to(beta.dtype) if need[8] else None,
        *([None] * (n_in - 9)),
    )


def _thresholds(gamma: Tensor, beta: Tensor, act: str):
    """``(lo, hi)``: per channel, the activation passes its input ``gamma * xh + beta`` (ReLU: above 0; ReLU6: also
    below 6) where ``xh > lo`` and ``xh < hi``, both comparisons flipped where ``gamma < 0`` (None: no bound). A
    channel with ``gamma == 0`` passes everywhere or nowhere, by ``beta``."""
    if act == "none":
        return None, None
    inf = torch.full_like(beta, float("inf"))
    safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
    lo = torch.where(gamma == 0, torch.where(beta > 0, -inf, inf), -beta / safe)
    if act == "relu":
        return lo, None
    return lo, torch.where(gamma == 0, torch.where(beta < 6, inf, -inf), (6 - beta) / safe)


def _visible() -> bool:
    return torch.compiler.is_compiling() or backends.user_mode_active()


stem.register_autograd(_backward, setup_context=_setup)
