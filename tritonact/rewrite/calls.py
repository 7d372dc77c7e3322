"""The call sites of the rewritten graph: small modules that hold one of the user's modules (shared, not copied)
and call the ``tritonact::`` ops for it, or the module itself where the approximate path does not apply at run
time (eval mode, no autograd, an unexpected shape, an empty batch).

A unit returns ``(output, code)``; ``code`` is a :class:`Code` (tensors plus the primitives that describe them) or
None where the unit ran exactly. Consumers take the code as a second argument.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from tritonact import backends, saved, sync
from tritonact import reference as ref
from tritonact.config import DEFAULT_WINDOW, MIN_VALUES, ApproxConfig
from tritonact.ops.bn_act import BNActFn, direct
from tritonact.ops.coded import ConvFn, MaxPoolFn
from tritonact.ops.fork import conv_fork, fork
from tritonact.ops.stem import conv_hw
from tritonact.quant import memory_order
from tritonact.rewrite.plan import JOIN_FEW_VALUES, UnitSpec, pair

__all__ = ["Code", "Unit", "CodedConv", "CodedPool", "Stem", "MIN_VALUES"]


class Code(NamedTuple):
    """A unit output's code as it flows through the graph (see ``tritonact.backends.CodeRef``)."""

    data: torch.Tensor
    P: torch.Tensor
    local: torch.Tensor | None
    shape: list
    perm: list
    bits: int
    act: str
    pool: list
    esc: torch.Tensor | None = None  # escaped values (tritonact.outliers)


class Unit(nn.Module):
    """One fused BN (+ add) + activation unit."""

    def __init__(self, spec: UnitSpec, config: ApproxConfig, ring=None, slot: int | None = None):
        super().__init__()
        self.bn = spec.bn
        self.spec = spec
        self.config = config
        self.bits, self.window, self.naive = config.bits, config.effective_window, config.naive
        self.ring, self.slot, self.use_ring = ring, slot, config.ring

    def forward(self, y, residual=None, res_code: Code | None = None, overwrite: bool = False):
        """``overwrite``: nothing but this unit reads ``y`` (a convolution's output, see ``codegen``), so a join may
        write its output into ``y``'s buffer where the backend can (one activation-sized tensor less at the
        forward's peak)."""
        bn, spec = self.bn, self.spec
        group = sync.group_key(bn) if bn.training else ""
        if group and y.numel() == 0 and torch.is_grad_enabled():
            return self._empty(y, residual, group), None
        if (
            not bn.training
            or not torch.is_grad_enabled()
            or y.dim() != 4
            or y.numel() == 0
            or (y.numel() < MIN_VALUES * y.shape[1] and not group)  # few values per channel (MIN_VALUES; a
            # SyncBatchNorm's count is the global batch's, and PyTorch's own refuses CPU tensors)
            or (residual is not None and residual.shape != y.shape)
        ):
            # the module's own math (a BatchNormAct2d's act runs after the unit)
            z = (nn.SyncBatchNorm if isinstance(bn, nn.SyncBatchNorm) else nn.BatchNorm2d).forward(bn, y)
            if residual is not None:
                z = z + residual
            if bn.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                spec.last_code_bytes = spec.last_full_bytes = y.numel() * y.element_size()  # kept in full
            return ref.apply_act(z, spec.act), None
        if not y.permute(memory_order(y)).is_contiguous():
            y = y.contiguous()
        perm = list(memory_order(y))
        gamma, beta, rm, rv, nbt = self.bn_args(y.shape[1], y)
        backend = backends.effective(spec.backend)
        if res_code is not None:
            rc = (res_code.data, res_code.P, res_code.local, res_code.shape, res_code.perm, res_code.pool, res_code.act)
            res_esc = res_code.esc
        else:
            rc, res_esc = (None, None, None, [], [], [], "none"), None
        values = y.numel() // y.shape[1]
        store_xh = residual is not None and (spec.store_xh or (spec.few_codes and values <= JOIN_FEW_VALUES))
        bits, window = self.width()
        args = (
            y, gamma, beta, residual, rm, rv, nbt, bn.momentum, bn.eps, *rc, bits, spec.act, window,
            self.config.positive_fraction_for(values), store_xh, self.naive, backend, group,
            self.config.centroids(bits) and values >= (2 << bits),  # a table only for 2 values per code or more
            spec.edge, res_esc,
        )  # fmt: skip
        into_y = (
            overwrite
            and residual is not None
            and not store_xh  # (its second code reads y after the output is written)
            and backends.get(backend).overwrites_input
            and y.dtype == residual.dtype
            and not torch.compiler.is_compiling()  # (inductor plans the buffers)
            and not _global_forward_hooks()  # (one may have kept the convolution's output)
        )
        if into_y:
            outputs = BNActFn.apply(y, *args)
        elif direct():
            outputs = BNActFn.apply(self._ring_slot(y, residual), *args)
        else:
            outputs = torch.ops.tritonact.bn_act(*args)
        out, data, P, invstd, xdata, xP, new_rm, new_rv, esc, xesc = outputs
        self.update_stats(rm, rv, new_rm, new_rv)
        if not torch.compiler.is_compiling():
            spec.last_code_bytes = data.nbytes + P.nbytes + xdata.nbytes + xP.nbytes + esc.nbytes + xesc.nbytes
            spec.last_full_bytes = y.numel() * y.element_size()
            spec.last_two_codes = store_xh
            if spec.spread_codes and residual is not None:
                spec.last_P = P.detach()  # the sum's grid, for the next forward's decide_joins
        code = Code(data, P, None, list(y.shape), perm, bits, spec.act, [], esc)
        saved.offer(out, code, backend)
        return out, code

    def bn_args(self, C: int, like: torch.Tensor) -> tuple:
        """``(gamma, beta, running_mean, running_var, num_batches_tracked)`` for a training forward of the BN over
        ``C`` channels (ones and zeros where it has no affine parameters; None where it tracks no statistics), with
        this batch counted in ``num_batches_tracked``, as ``nn.BatchNorm2d`` counts it before normalizing."""
        bn = self.bn
        pdt = bn.running_mean.dtype if bn.running_mean is not None else torch.promote_types(like.dtype, torch.float32)
        gamma = bn.weight if bn.weight is not None else torch.ones(C, device=like.device, dtype=pdt)
        beta = bn.bias if bn.bias is not None else torch.zeros(C, device=like.device, dtype=pdt)
        rm = rv = nbt = None
        if bn.track_running_stats:
            rm, rv = bn.running_mean, bn.running_var
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                nbt = bn.num_batches_tracked
        return gamma, beta, rm, rv, nbt

    def width(self) -> tuple[int, float]:
        """``(bits, window)`` of this unit's code (a unit coded at other bits than the context's gets their
        default window)."""
        bits = self.spec.bits or self.bits
        return bits, (self.window if bits == self.bits else DEFAULT_WINDOW[bits])

    @staticmethod
    def update_stats(rm, rv, new_rm, new_rv) -> None:
        """The op's running statistics after the batch, copied into the module's buffers."""
        if rm is not None:
            rm.copy_(new_rm.detach())
            rv.copy_(new_rv.detach())

    def _empty(self, y, residual, group):
        """A SyncBatchNorm unit's empty batch on this rank (see ``tritonact.sync.EmptyBatch``)."""
        bn = self.bn
        eaf = 0.0 if bn.momentum is None else bn.momentum
        rm = rv = None
        if bn.track_running_stats:
            rm, rv = bn.running_mean, bn.running_var
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                eaf = 1.0 / float(bn.num_batches_tracked)
        dtype = y.dtype if residual is None else torch.promote_types(y.dtype, residual.dtype)
        out = sync.EmptyBatch.apply(y, group, bn.eps, eaf, rm, rv, dtype)
        return out if residual is None else out + residual

    def _ring_slot(self, y, residual):
        if self.ring is None or self.slot is None or torch.compiler.is_compiling():
            return None
        if self.use_ring is not True:  # on only when asked for (ApproxConfig.ring)
            return None
        dtype = y.dtype if residual is None else torch.promote_types(y.dtype, residual.dtype)
        return self.ring.like(self.slot, y, dtype)


def _global_forward_hooks() -> bool:
    """Whether a user's forward hook for every module (``nn.modules.module.register_module_forward_hook``) exists:
    it sees each convolution's output, which a join would then overwrite. PyTorch's own tools register such hooks
    too (MemTracker's and FlopCounterMode's module trackers) and keep no outputs: hooks defined in ``torch`` are
    not counted."""
    hooks = getattr(nn.modules.module, "_global_forward_hooks", None) or {}
    return any(not (getattr(h, "__module__", None) or "").startswith("torch.") for h in hooks.values())


class CodedConv(nn.Module):
    """A ``Conv2d`` whose backward keeps its input's code."""

    def __init__(self, conv: nn.Conv2d, backend: str):
        super().__init__()
        self.conv, self.backend = conv, backend

    def forward(self, x, code: Code | None, aliases: int = 0):
        """The conv's output; with ``aliases`` = n, ``(output, *n aliases of x)`` for ``x``'s other readers, whose
        gradients the conv's backward adds its input gradient into (``tritonact.ops.fork``)."""
        c = self.conv
        if code is None or not torch.is_grad_enabled() or x.dim() != 4:
            if not aliases:
                return c(x)
            x, *others = fork(x, aliases + 1)
            return (c(x), *others)
        args = (
            x, c.weight, c.bias, list(pair(c.stride)), list(pair(c.padding)), list(pair(c.dilation)), c.groups,
            code.data, code.P, code.local, code.shape, code.perm, code.bits, code.act, code.pool,
            backends.effective(self.backend), code.esc,
        )  # fmt: skip
        if aliases:
            return conv_fork(*args, aliases)
        return ConvFn.apply(*args) if direct() else torch.ops.tritonact.conv2d(*args)


class CodedPool(nn.Module):
    """A ``MaxPool2d`` that keeps a uint8 argmax; its output's code is its input's code plus that argmax."""

    def __init__(self, pool: nn.MaxPool2d, backend: str):
        super().__init__()
        self.pool, self.backend = pool, backend
        p = pool
        self.geom = (
            list(pair(p.kernel_size)), list(pair(p.stride if p.stride is not None else p.kernel_size)),
            list(pair(p.padding)), list(pair(p.dilation)),
        )  # fmt: skip

    def forward(self, x, code: Code | None):
        if code is None or code.local is not None or not torch.is_grad_enabled() or x.dim() != 4:
            return self.pool(x), None
        k, s, p, d = self.geom
        run = MaxPoolFn.apply if direct() else torch.ops.tritonact.max_pool2d
        out, local = run(x, k, s, p, d, self.pool.ceil_mode, backends.effective(self.backend))
        return out, code._replace(local=local, pool=k + s + p + d + list(out.shape[-2:]))


class Stem(nn.Module):
    """A convolution, the unit that alone reads its output and the max-pool that alone reads the unit's, as one
    ``tritonact::stem`` call (the unit's BN input is computed again in backward from the convolution's input); the
    pool's output comes with a code of its own. Where the approximate path does not apply, the three call sites'
    own paths."""

    def __init__(self, conv: nn.Conv2d, unit: Unit, pool: CodedPool):
        super().__init__()
        self.conv, self.unit, self.coded_pool = conv, unit, pool

    def forward(self, x):
        c, bn, spec, config = self.conv, self.unit.bn, self.unit.spec, self.unit.config
        stride, padding, dilation = (list(pair(v)) for v in (c.stride, c.padding, c.dilation))
        C, values = c.out_channels, 0
        if x.dim() == 4:  # per channel: the batch times the convolution output's height and width
            oh, ow = conv_hw(x.shape, c.kernel_size, stride, padding, dilation)
            values = x.shape[0] * oh * ow
        if (
            not bn.training
            or not torch.is_grad_enabled()
            or values < MIN_VALUES
            or sync.group_key(bn)  # a SyncBatchNorm in a process group: the unit's own path (global statistics)
            or (_global_forward_hooks() and not torch.compiler.is_compiling())  # a hook for every module sees conv
        ):
            return self.coded_pool(*self.unit(c(x)))
        gamma, beta, rm, rv, nbt = self.unit.bn_args(C, x)
        bits, window = self.unit.width()
        k, s, p, d = self.coded_pool.geom
        backend = backends.effective(spec.backend)
        out, data, P, invstd, new_rm, new_rv, local, esc = torch.ops.tritonact.stem(
            x, c.weight, c.bias, stride, padding, dilation, c.groups, gamma, beta, rm, rv, nbt, bn.momentum, bn.eps,
            k, s, p, d, self.coded_pool.pool.ceil_mode, bits, spec.act, window, config.positive_fraction_for(values),
            backend, config.centroids(bits) and values >= (2 << bits), spec.edge,
        )  # fmt: skip
        self.unit.update_stats(rm, rv, new_rm, new_rv)
        if not torch.compiler.is_compiling():
            spec.last_code_bytes = data.nbytes + P.nbytes + esc.nbytes + local.nbytes
            spec.last_full_bytes = values * C * out.element_size()
            spec.last_two_codes = False
        code = Code(data, P, None, list(out.shape), list(memory_order(out)), bits, spec.act, [], esc)
        saved.offer(out, code, backend)
        return out, code


def backend_name(config: ApproxConfig, device: torch.device) -> str:
    """The backend of a model's call sites (chosen once, at conversion): see ``tritonact.backends.select``."""
    return backends.select(config.backend, device, config.effective_compile)
