"""One value read by several differentiable consumers, whose gradients are summed in place.

Autograd sums the gradients of a tensor with several readers itself, in place only where it can prove nothing else
holds the first one (``can_accumulate_inplace``, torch/csrc/autograd/input_buffer.cpp). Inside a dispatch mode
(MemTracker, FlopCounterMode) it cannot, and the sum is a third activation-sized tensor beside the two it adds: at
a ResNet block input (read by the block's first convolution and by its residual) that was the peak of the
backward pass. :func:`fork` gives each reader its own alias of the value, so autograd hands the gradients to
:class:`Fork`'s backward separately, which adds them into one that nothing else holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tritonact.ops.bn_act import direct
from tritonact.ops.bn_act import owned as _owned
from tritonact.ops.coded import _conv2d, _conv_backward, _conv_setup

__all__ = ["fork", "Fork", "ConvFork", "conv_fork"]


def _sum(gs: list[Tensor]) -> Tensor:
    """The sum of gradients ``gs``, added into the first one of the result's dtype that nothing else holds."""
    if torch.is_grad_enabled():  # create_graph: a differentiable sum
        return sum(gs[1:], gs[0])
    dtype = gs[0].dtype
    for g in gs[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    owned = [i for i, g in enumerate(gs) if g.dtype == dtype and _owned(g)]
    if not owned:
        return sum(gs[1:], gs[0])
    acc = gs.pop(owned[0])  # takes the sum; the others are released on return
    for g in gs:
        acc.add_(g)
    return acc


class Fork(torch.autograd.Function):
    """``n`` aliases of ``x`` (sharing its storage and version counter); the backward sums their gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, n: int):
        return tuple(x.detach() for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        gs = [g for g in grads if g is not None]
        return (_sum(gs) if gs else None), None


def fork(x: Tensor, n: int):
    """``n`` readers' aliases of ``x`` (``x`` itself ``n`` times under ``torch.compile``, whose planner reuses
    buffers, and where no gradient is taken)."""
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and x.requires_grad):
        return (x,) * n
    return Fork.apply(x, n)


class ConvFork(torch.autograd.Function):
    """``tritonact::conv2d`` of ``x`` plus ``n`` aliases of ``x`` for its other readers. The backward adds the
    convolution's input gradient into the others' (summed first, where there are several) a few samples at a time,
    so the input gradient is never a second activation-sized tensor beside theirs."""

    @staticmethod
    def forward(ctx, *inputs):  # tritonact::conv2d's arguments, then n
        args, n = inputs[:-1], inputs[-1]
        out = _conv2d(*args) if direct() else torch.ops.tritonact.conv2d(*args)
        _conv_setup(ctx, args, out)
        return (out, *(args[0].detach() for _ in range(n)))

    @staticmethod
    def backward(ctx, g, *grads):
        gs = [g for g in grads if g is not None]
        into = _sum(gs) if gs else None
        if into is not None and ctx.needs_input_grad[0]:
            fits = into.dtype == ctx.dtype == ctx.x_dtype and not torch.is_grad_enabled() and _owned(into)
            if not fits:  # added after the conv's own
                gi, *rest = _conv_backward(ctx, g)
                return (into if gi is None else into + gi), *rest, None
        return (*_conv_backward(ctx, g, into if ctx.needs_input_grad[0] else None), None)


def conv_fork(*inputs):
    """:class:`ConvFork` (the op and ``x`` itself ``n`` times under ``torch.compile``)."""
    if torch.compiler.is_compiling():
        return (torch.ops.tritonact.conv2d(*inputs[:-1]), *(inputs[0],) * inputs[-1])
    return ConvFork.apply(*inputs)
