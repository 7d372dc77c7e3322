"""Autograd ops of the approximate path: fused BN(+add)+activation, and the conv / max-pool that consume its code.

Every tensor an op keeps for backward goes through ``save_for_backward`` (so ``saved_tensors_hooks`` and memory
tools see it); ``ctx`` attributes hold only python metadata. A unit's code is produced once and every consumer
saves the very same tensors, so it is stored once.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tritonact import compiled
from tritonact import reference as ref
from tritonact.config import ApproxConfig
from tritonact.quant import memory_order

# ----------------------------------------------------------------------------------------------------------
# codes


@dataclass(frozen=True)
class ActMeta:
    """What is needed, besides its tensors ``(data, params)``, to decode a unit's code. Holds no tensor."""

    bits: int
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    dtype: torch.dtype
    act: str
    backend: str
    compiled: bool = False  # torch backend: the compiled CPU path (tritonact.compiled) where it applies
    n_tensors: int = 2

    def decode_act(self, tensors, dtype=None, out=None) -> torch.Tensor:
        data, P = tensors
        dtype = dtype or self.dtype
        a = None
        if self.backend == "triton":
            from tritonact.kernels.bn_act import decode_act

            a = decode_act(data, P, self.bits, self.shape, self.perm, self.act, dtype)
        elif self.compiled and compiled.enabled(data.device):
            a = compiled.decode_act(data, P, self.bits, self.shape, self.perm, self.act, dtype)
        if a is not None:
            return a if out is None else out.copy_(a)
        return ref.decode_act_ref(data, P, self.bits, self.shape, self.perm, self.act, dtype, out=out)

    def decode_act_range(self, tensors, n0: int, n1: int, dtype=None) -> torch.Tensor:
        """The decoded activation of samples ``[n0, n1)`` only."""
        data, P = tensors
        per = math.prod(self.shape[1:])
        if self.perm[0] != 0 or (n0 * per * self.bits) % 8:
            return self.decode_act(tensors, dtype)[n0:n1]
        sub = ActMeta(
            self.bits, (n1 - n0,) + tuple(self.shape[1:]), self.perm, self.dtype, self.act, self.backend, self.compiled
        )
        return sub.decode_act((data[n0 * per * self.bits // 8 : (n1 * per * self.bits + 7) // 8], P), dtype)

    def decode_value(self, tensors):
        data, P = tensors
        if self.backend == "triton":
            from tritonact.kernels.bn_act import decode_value

            return decode_value(data, P, self.bits, self.shape, self.perm)
        return ref.decode_value_ref(data, P, self.bits, self.shape, self.perm, self.act)


@dataclass(frozen=True)
class PoolMeta:
    """A max-pool output, decoded as its input's code gathered at the stored window-local argmax."""

    parent: ActMeta | PoolMeta
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def n_tensors(self) -> int:
        return self.parent.n_tensors + 1

    @property
    def compiled(self) -> bool:
        return self.parent.compiled

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    def global_index(self, local: torch.Tensor) -> torch.Tensor:
        return _global_index(local, self.in_shape, self.kernel, self.stride, self.padding, self.dilation)

    def decode_act(self, tensors, dtype=None, out=None) -> torch.Tensor:
        *parent_tensors, local = tensors
        a = self.parent.decode_act(parent_tensors, dtype, out=out)
        return self._gather(a, local, self.in_shape)

    def decode_act_range(self, tensors, n0: int, n1: int, dtype=None) -> torch.Tensor:
        *parent_tensors, local = tensors
        a = self.parent.decode_act_range(parent_tensors, n0, n1, dtype)
        return self._gather(a, local[n0:n1], (n1 - n0,) + tuple(self.in_shape[1:]))

    def _gather(self, a, local, in_shape):
        N, C, H, W = in_shape
        out = torch.empty((N,) + tuple(self.out_shape[1:]), dtype=a.dtype, device=a.device)
        src = a.reshape(N, C, H * W)
        for n0, n1 in _batch_ranges(N, local[0].numel()):  # int64 indices a few samples at a time
            idx = _pool_index(
                "global",
                local[n0:n1],
                (n1 - n0, C, H, W),
                self.kernel,
                self.stride,
                self.padding,
                self.dilation,
                self.compiled,
            )
            torch.gather(src[n0:n1], 2, idx.reshape(n1 - n0, C, -1), out=out[n0:n1].view(n1 - n0, C, -1))
        return out


@dataclass
class Code:
    """A coded activation: python metadata plus the tensors a consumer saves to decode it later."""

    meta: ActMeta | PoolMeta
    tensors: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def decode_act(self, dtype=None) -> torch.Tensor:
        return self.meta.decode_act(self.tensors, dtype)


class _Box:
    """Carries tensors produced inside an autograd Function's forward out to the caller."""

    tensors: tuple = ()


# ----------------------------------------------------------------------------------------------------------
# fused BN (+ residual add) + activation


@dataclass(eq=False)
class UnitSpec:
    """One fused unit of the rewritten model: which modules it covers and how it codes its output."""

    name: str
    bn: nn.BatchNorm2d
    act: str  # "relu" | "relu6" | "none"
    has_residual: bool
    config: ApproxConfig
    backend: str
    store_xh: bool = False  # residual join whose BN value is stored as a second code (gamma ~ 0 at entry)
    compiled: bool = False  # torch backend on CPU: run tritonact.compiled where it applies
    covers: tuple[str, ...] = ()
    last_code_bytes: int = field(default=0, repr=False)
    last_full_bytes: int = field(default=0, repr=False)


def _bn_momentum(bn: nn.BatchNorm2d) -> float:
    """Exactly what ``nn.BatchNorm2d.forward`` does to its counters in training mode."""
    eaf = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        eaf = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return eaf


def _unit_forward_torch(spec: UnitSpec, y, gamma, beta, residual, out=None):
    """The unit's forward on the torch backend: BN (the module's own op, so output and running statistics are
    bit-identical to ``nn.BatchNorm2d``), the residual add and the activation written into ``out`` (a ring slot,
    or a fresh tensor), and the codes, made a few samples at a time so temporaries stay small."""
    bn, bits = spec.bn, spec.config.bits
    rm = bn.running_mean if bn.track_running_stats else None
    rv = bn.running_var if bn.track_running_stats else None
    eaf = _bn_momentum(bn)
    out_dtype = y.dtype if residual is None else torch.promote_types(y.dtype, residual.dtype)
    if out is None:
        out = torch.empty_like(y, dtype=out_dtype)
    perm = memory_order(y)
    if out_dtype == y.dtype:
        C = y.shape[1]
        mean = torch.empty(C, dtype=torch.float32, device=y.device)
        invstd = torch.empty_like(mean)
        torch.ops.aten.native_batch_norm.out(
            y, gamma, beta, rm, rv, True, eaf, bn.eps, out=out, save_mean=mean, save_invstd=invstd
        )
        if residual is not None:
            out.add_(residual)  # the model's own add, same rounding
    else:
        z, mean, invstd = torch.native_batch_norm(y, gamma, beta, rm, rv, True, eaf, bn.eps)
        torch.add(z, residual, out=out)
        del z
    if spec.compiled and compiled.enabled(y.device):
        codes = _unit_codes_compiled(spec, y, mean, invstd, gamma, beta, residual, out, perm)
        if codes is not None:
            _activate(out, spec.act)
            return (out, *codes)
    # per-channel range of the coded value
    dims = ref.channel_dims(y)
    bmean, binv = ref.bview(mean, y), ref.bview(invstd, y)
    if residual is None or spec.store_xh:  # xh is monotone in y: its range comes from y's
        xmin = (y.amin(dim=dims).float() - mean) * invstd
        xmax = (y.amax(dim=dims).float() - mean) * invstd
        xh_P = lambda act: _params(
            spec, act, "xh", (xmin, xmax, torch.zeros_like(xmin), torch.ones_like(xmin)), gamma, beta
        )
    if residual is not None:
        P = _params(
            spec,
            spec.act,
            "sum",
            ref.value_stats(out if out.dtype == torch.float32 else out.float(), "sum"),
            gamma,
            beta,
        )
        extra_P = xh_P("none") if spec.store_xh else None
    else:
        P, extra_P = xh_P(spec.act), None
    data = torch.empty((y.numel() * bits + 7) // 8, dtype=torch.uint8, device=y.device)
    extra_data = torch.empty_like(data) if extra_P is not None else None
    for n0, n1, b0, b1 in ref.sample_chunks(tuple(y.shape), perm, bits):
        if residual is None or spec.store_xh:
            xh = y[n0:n1].float().sub_(bmean).mul_(binv) if y.dtype != torch.float32 else (y[n0:n1] - bmean).mul_(binv)
        if residual is None:
            data[b0:b1] = ref.encode_ref(xh, P, bits, spec.act)
        else:
            data[b0:b1] = ref.encode_ref(out[n0:n1].float(), P, bits, spec.act)
            if extra_data is not None:
                extra_data[b0:b1] = ref.encode_ref(xh, extra_P, bits, "none")
    _activate(out, spec.act)
    extra = (extra_data, extra_P) if extra_data is not None else ()
    return out, data, P, invstd, extra


def _activate(out, act):
    if act == "relu":
        out.relu_()
    elif act == "relu6":
        out.clamp_(0.0, 6.0)


def _unit_codes_compiled(spec, y, mean, invstd, gamma, beta, residual, out, perm):
    """``(data, P, invstd, extra)`` of the unit by the compiled CPU path (``out`` holds the pre-activation
    value), or None where it does not apply."""
    cfg = spec.config
    kw = dict(bits=cfg.bits, window=cfg.effective_window, pf=cfg.positive_fraction, perm=perm)
    if residual is None:
        codes = compiled.forward_xh(y, mean, invstd, gamma, beta, act=spec.act, **kw)
        return None if codes is None else (*codes, invstd, ())
    codes = compiled.forward_sum(out, gamma, beta, act=spec.act, **kw)
    if codes is None:
        return None
    extra = ()
    if spec.store_xh:
        extra = compiled.forward_xh(y, mean, invstd, gamma, beta, act="none", **kw)
        if extra is None:
            return None
    return (*codes, invstd, tuple(extra))


def _params(spec, act, coded, stats, gamma, beta):
    cfg = spec.config
    wmin, wmax, wmean, wstd = stats
    return ref.code_params(
        bits=cfg.bits,
        act=act,
        wmin=wmin,
        wmax=wmax,
        wmean=wmean,
        wstd=wstd,
        gamma=gamma,
        beta=beta,
        coded=coded,
        window=cfg.effective_window,
        positive_fraction=cfg.positive_fraction,
    )


def _no_autocast(device_type: str):
    """Autocast off inside a unit (its formulas run in fp32); a no-op context where autocast is off already (entering
    ``torch.autocast`` costs tens of microseconds of python per call)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _BNActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, box, res_meta, y, gamma, beta, residual, *res_tensors):
        with _no_autocast(y.device.type):
            if spec.backend == "triton":
                from tritonact.kernels.bn_act import unit_forward

                out, data, P, invstd, extra = unit_forward(spec, y, gamma, beta, residual, out=box.out)
            else:
                out, data, P, invstd, extra = _unit_forward_torch(spec, y, gamma, beta, residual, box.out)
        meta = ActMeta(
            spec.config.bits, tuple(y.shape), memory_order(y), y.dtype, spec.act, spec.backend, spec.compiled
        )
        if spec.config.naive:
            out = meta.decode_act((data, P), out.dtype, out=out)
        box.tensors = (data, P)
        box.meta = meta
        saved_res = ()
        ctx.res_mode = None
        if residual is not None:
            if spec.store_xh:
                ctx.res_mode = "xh"
            elif res_meta is not None:
                ctx.res_mode, saved_res = "code", res_tensors
            else:
                ctx.res_mode, saved_res = "exact", (residual,)
            ctx.res_dtype = residual.dtype
        ctx.meta, ctx.res_meta, ctx.n_extra = meta, res_meta, len(extra)
        ctx.save_for_backward(data, P, invstd, gamma, beta, *extra, *saved_res)
        return out

    @staticmethod
    def backward(ctx, g):
        data, P, invstd, gamma, beta, *rest = ctx.saved_tensors
        extra, saved_res = rest[: ctx.n_extra], rest[ctx.n_extra :]
        meta: ActMeta = ctx.meta
        use_compiled = meta.backend == "torch" and meta.compiled and compiled.enabled(g.device)
        use_compiled = use_compiled and compiled.layout3(meta.shape, meta.perm, meta.bits) is not None
        with _no_autocast(g.device.type):
            residual = xh_code = res_code = None
            if ctx.res_mode == "xh":
                xh_code = tuple(extra)
            elif ctx.res_mode == "code":
                res_meta, res_tensors = ctx.res_meta, tuple(saved_res)
                if use_compiled and _same_grid_layout(res_meta, meta):  # decoded inside the compiled backward
                    res_code = (*res_tensors, res_meta.act)
                elif meta.backend == "triton" or use_compiled:
                    residual = res_meta.decode_act(res_tensors, torch.float32)
                else:  # decoded a few samples at a time, inside the chunked backward
                    residual = lambda n0, n1: res_meta.decode_act_range(res_tensors, n0, n1, torch.float32)
            elif ctx.res_mode == "exact":
                residual = saved_res[0]
            args = (g, data, P, meta.bits, meta.shape, meta.perm, meta.act, gamma, beta, invstd, residual, xh_code)
            if meta.backend == "triton":
                from tritonact.kernels.bn_act import unit_backward

                out = unit_backward(*args)
            else:
                out = compiled.unit_backward(*args, residual_code=res_code) if use_compiled else None
                if out is None:
                    if res_code is not None:  # the compiled path gave up: the residual as a tensor after all
                        args = args[:10] + (ctx.res_meta.decode_act(tuple(saved_res), torch.float32),) + args[11:]
                    out = ref.unit_backward_ref(*args)
            g_y, g_gamma, g_beta, g_res = out
        need = ctx.needs_input_grad
        return (
            None,
            None,
            None,
            g_y.to(meta.dtype) if need[3] else None,
            g_gamma if need[4] else None,
            g_beta if need[5] else None,
            g_res.to(ctx.res_dtype) if (g_res is not None and need[6]) else None,
            *([None] * (len(ctx.needs_input_grad) - 7)),
        )


def _same_grid_layout(a, b: ActMeta) -> bool:
    """Whether code ``a`` is a unit's own code (not a max-pool's) with ``b``'s shape, layout and bit width."""
    return type(a) is ActMeta and (a.shape, a.perm, a.bits, a.backend) == (b.shape, b.perm, b.bits, b.backend)


def bn_act(spec: UnitSpec, y, residual=None, res_code: Code | None = None, ring=None, slot=None):
    """Run one unit. Returns ``(output, Code | None)``; the exact module path (no code) where the unit does not
    apply at run time (BN in eval mode, no autograd, an unexpected shape). With a ``ring`` and a ``slot`` the
    output is written into that ring slot."""
    bn = spec.bn
    if (
        not bn.training
        or not torch.is_grad_enabled()
        or y.dim() != 4
        or y.numel() == y.shape[1]  # one value per channel: the module raises its own error
        or (residual is not None and residual.shape != y.shape)
    ):
        z = bn(y)
        if residual is not None:
            z = z + residual
        return ref.apply_act(z, spec.act), None
    gamma = bn.weight if bn.weight is not None else torch.ones(y.shape[1], device=y.device)
    beta = bn.bias if bn.bias is not None else torch.zeros(y.shape[1], device=y.device)
    if y.dim() == 4 and not y.permute(memory_order(y)).is_contiguous():
        y = y.contiguous()
    box = _Box()
    box.out = None
    if ring is not None and slot is not None:
        dtype = y.dtype if residual is None else torch.promote_types(y.dtype, residual.dtype)
        box.out = ring.like(slot, y, dtype)
    res_meta, res_tensors = (res_code.meta, res_code.tensors) if res_code is not None else (None, ())
    out = _BNActFn.apply(spec, box, res_meta, y, gamma, beta, residual, *res_tensors)
    code = Code(box.meta, box.tensors)
    spec.last_code_bytes = code.nbytes
    spec.last_full_bytes = y.numel() * y.element_size()
    return out, code


# ----------------------------------------------------------------------------------------------------------
# convolution that saves its input's code


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, conv, meta, ring, x, weight, bias, *code_tensors):
        out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.conv, ctx.meta, ctx.ring = conv, meta, ring
        ctx.x_shape, ctx.x_perm = tuple(x.shape), memory_order(x)
        ctx.compute_dtype, ctx.x_dtype = out.dtype, x.dtype
        ctx.bias_sizes = [bias.shape[0]] if bias is not None else None
        ctx.save_for_backward(weight, *code_tensors)
        return out

    @staticmethod
    def backward(ctx, g):
        weight, *code_tensors = ctx.saved_tensors
        conv, dt = ctx.conv, ctx.compute_dtype
        scratch = None
        if ctx.ring is not None and isinstance(ctx.meta, ActMeta):  # decoded input lives in the ring's scratch
            # slot 0: every forward activation in the ring is dead once the backward runs
            scratch = ctx.ring.take(0, ctx.x_shape, ctx.x_perm, dt, g.device)
        a = ctx.meta.decode_act(tuple(code_tensors), dt, out=scratch)
        need = ctx.needs_input_grad
        gi, gw, gb = torch.ops.aten.convolution_backward(
            g.to(dt),
            a,
            weight.to(dt),
            ctx.bias_sizes,
            list(conv.stride),
            list(conv.padding),
            list(conv.dilation),
            False,
            [0, 0],
            conv.groups,
            [need[3], need[4], bool(need[5])],
        )
        return (
            None,
            None,
            None,
            gi.to(ctx.x_dtype) if gi is not None else None,
            gw.to(weight.dtype) if gw is not None else None,
            gb if need[5] else None,
            *([None] * len(code_tensors)),
        )


def conv_eligible(conv: nn.Module) -> str | None:
    """None if the conv can consume codes, else why not."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    return None


def conv_coded(conv: nn.Conv2d, x, code: Code | None, ring=None):
    if code is None or not torch.is_grad_enabled() or x.dim() != 4:
        return conv(x)
    return _ConvFn.apply(conv, code.meta, ring, x, conv.weight, conv.bias, *code.tensors)


# ----------------------------------------------------------------------------------------------------------
# max-pool that saves a uint8 window-local argmax


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _batch_ranges(N: int, per_sample: int, target: int | None = None):
    target = ref.CHUNK_ELEMENTS // 4 if target is None else target  # int64 indices: 8 bytes per element
    k = max(1, target // max(per_sample, 1))
    return [(n0, min(N, n0 + k)) for n0 in range(0, N, k)]


def _index_dtype(in_shape) -> torch.dtype:
    """Float dtype in which the index arithmetic below is exact: fp32 while a plane has at most 2**20 positions
    (indices, and the rounding margin of ``floor((i + 0.5) / W)``, stay far inside fp32's 24-bit mantissa), else
    fp64. Float arithmetic, because integer division does not vectorize on CPU: 4x faster eager, 11x compiled."""
    return torch.float32 if in_shape[2] * in_shape[3] <= 1 << 20 else torch.float64


def _window_origins(OH: int, OW: int, stride, padding, device, dtype):
    """Top-left input coordinates ``(h0 (OH, 1), w0 (1, OW))`` of each max-pool window."""
    h0 = (torch.arange(OH, device=device, dtype=dtype) * stride[0] - padding[0]).view(OH, 1)
    w0 = (torch.arange(OW, device=device, dtype=dtype) * stride[1] - padding[1]).view(1, OW)
    return h0, w0


def _global_index(local, in_shape, kernel, stride, padding, dilation, dtype=None):
    """Flat ``H * W`` input index (int64) of each window-local argmax (``local``: uint8, the pool's output shape).
    ``dtype``: that of the arithmetic (:func:`_index_dtype` of ``in_shape`` unless given)."""
    dtype = dtype or _index_dtype(in_shape)
    W = in_shape[3]
    h0, w0 = _window_origins(*local.shape[-2:], stride, padding, local.device, dtype)
    loc = local.to(dtype)
    kh = torch.floor((loc + 0.5) / kernel[1])
    kw = loc - kh * kernel[1]
    return ((h0 + kh * dilation[0]) * W + (w0 + kw * dilation[1])).long()


def _local_index(idx, in_shape, kernel, stride, padding, dilation, dtype=None):
    """Inverse of :func:`_global_index`: the window-local position (uint8) of a flat ``H * W`` argmax."""
    dtype = dtype or _index_dtype(in_shape)
    W = in_shape[3]
    h0, w0 = _window_origins(*idx.shape[-2:], stride, padding, idx.device, dtype)
    t = idx.to(dtype)
    ih = torch.floor((t + 0.5) / W)
    kh = torch.floor((ih - h0 + 0.5) / dilation[0])
    kw = torch.floor((t - ih * W - w0 + 0.5) / dilation[1])
    return (kh * kernel[1] + kw).to(torch.uint8)


def _pool_index(direction, t, in_shape, kernel, stride, padding, dilation, use_compiled):
    """:func:`_local_index` / :func:`_global_index`, compiled where the unit's config says so (CPU)."""
    if use_compiled and compiled.enabled(t.device):
        out = compiled.pool_index(direction, t, in_shape, kernel, stride, padding, dilation)
        if out is not None:
            return out
    f = _local_index if direction == "local" else _global_index
    return f(t, in_shape, kernel, stride, padding, dilation)


class _MaxPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, geom, box, x):
        kernel, stride, padding, dilation, ceil_mode, use_compiled = geom
        out, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
        local = _pool_index("local", idx, tuple(x.shape), kernel, stride, padding, dilation, use_compiled)
        box.local = local
        ctx.geom, ctx.in_shape = geom, tuple(x.shape)
        ctx.cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        ctx.save_for_backward(local)
        return out

    @staticmethod
    def backward(ctx, g):
        (local,) = ctx.saved_tensors
        kernel, stride, padding, dilation, _, use_compiled = ctx.geom
        N, C, H, W = ctx.in_shape
        gi = torch.zeros(N, C, H * W, dtype=g.dtype, device=g.device)
        for n0, n1 in _batch_ranges(N, C * local.shape[-1] * local.shape[-2]):  # int64 indices a few at a time
            sub = (n1 - n0, C, H, W)
            idx = _pool_index("global", local[n0:n1], sub, kernel, stride, padding, dilation, use_compiled)
            gi[n0:n1].scatter_add_(2, idx.reshape(n1 - n0, C, -1), g[n0:n1].reshape(n1 - n0, C, -1))
        gi = gi.view(N, C, H, W)
        if ctx.cl:
            gi = gi.contiguous(memory_format=torch.channels_last)
        return None, None, gi


def pool_eligible(pool: nn.Module) -> str | None:
    if type(pool) is not nn.MaxPool2d:
        return f"{type(pool).__name__} is not nn.MaxPool2d"
    if pool.return_indices:
        return "return_indices=True"
    k = _pair(pool.kernel_size)
    if k[0] * k[1] > 256:
        return f"kernel {k} has more than 256 positions"
    return None


def maxpool_coded(pool: nn.MaxPool2d, x, code: Code | None):
    if code is None or not torch.is_grad_enabled() or x.dim() != 4:
        return pool(x), None
    k = _pair(pool.kernel_size)
    s = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    p, d = _pair(pool.padding), _pair(pool.dilation)
    box = _Box()
    out = _MaxPoolFn.apply((k, s, p, d, pool.ceil_mode, code.meta.compiled), box, x)
    pm = PoolMeta(code.meta, tuple(x.shape), tuple(out.shape), k, s, p, d)
    return out, Code(pm, tuple(code.tensors) + (box.local,))
