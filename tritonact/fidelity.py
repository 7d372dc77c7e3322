"""Gradient fidelity: how far the approximate backward pass is from exact training, per convolution weight.

Both runs start from deep copies of the same model (same weights, same buffers) in training mode and see the same
batch and the same RNG state (dropout draws the same masks), so every difference comes from ``approximate``::

    from tritonact.fidelity import grad_errors, summarize

    errs = grad_errors(model, x, target, bits=4)
    for name, depth, err in errs:
        print(depth, name, err)
    print(summarize(errs), errs.output_rel_diff, errs.loss_rel_diff)

The model passed in is never modified. To compare several settings against one exact run, compute it once with
:func:`exact_run` and pass it as ``exact=``.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExactRun", "GradErrors", "Summary", "exact_run", "grad_errors", "summarize", "rel_l2"]


def rel_l2(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` in float64 (``0`` when both are zero, ``inf`` when only exact is)."""
    a, e = approx.detach().double(), exact.detach().double()
    num, den = (a - e).norm().item(), e.norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


@dataclass
class ExactRun:
    """One exact training step's forward output, loss and conv weight gradients (depth order)."""

    output: torch.Tensor
    loss: torch.Tensor
    grads: dict  # conv weight name -> gradient
    depth: dict  # conv weight name -> index of the conv in forward execution order
    seed: int


class GradErrors(list):
    """A list of ``(param name, depth index, relative L2 error)``, one per conv weight, in depth order, with
    the forward check attached: ``output_rel_diff`` (relative L2 of the model outputs) and ``loss_rel_diff``
    (``|loss - loss_exact| / |loss_exact|``)."""

    output_rel_diff: float = float("nan")
    loss_rel_diff: float = float("nan")

    @property
    def errors(self) -> list[float]:
        return [e for _, _, e in self]


@dataclass(frozen=True)
class Summary:
    median: float
    max: float
    n: int

    def __str__(self) -> str:
        return f"median {self.median:.4f}, max {self.max:.4f} over {self.n} convs"


def summarize(errors) -> Summary:
    """Median and max of a :class:`GradErrors` (or any iterable of errors or of ``(name, depth, err)``)."""
    vals = [e[2] if isinstance(e, tuple) else float(e) for e in errors]
    if not vals:
        raise ValueError("no errors to summarize")
    return Summary(statistics.median(vals), max(vals), len(vals))


def _conv_weights(model: nn.Module) -> dict:
    return {
        f"{name}.weight" if name else "weight": m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd) and m.weight is not None and m.weight.requires_grad
    }


def _step(model: nn.Module, x, target, loss_fn: Callable, seed: int):
    model.train()
    model.zero_grad(set_to_none=True)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model(x)
        loss = loss_fn(out, target)
    loss.backward()
    return out.detach(), loss.detach()


def exact_run(
    model: nn.Module, x: torch.Tensor, target, *, loss_fn: Callable = F.cross_entropy, seed: int = 0
) -> ExactRun:
    """One exact training step (forward, ``loss_fn(output, target)``, backward) on a deep copy of ``model``."""
    m = copy.deepcopy(model)
    convs = _conv_weights(m)
    order: dict = {}

    def hook(mod, args):
        order.setdefault(id(mod), len(order))

    handles = [c.register_forward_pre_hook(hook) for c in convs.values()]
    try:
        out, loss = _step(m, x, target, loss_fn, seed)
    finally:
        for h in handles:
            h.remove()
    ran = sorted((order[id(c)], name) for name, c in convs.items() if id(c) in order)
    grads = {name: convs[name].weight.grad.detach().clone() for _, name in ran if convs[name].weight.grad is not None}
    depth = {name: i for i, (_, name) in enumerate(ran) if name in grads}
    return ExactRun(out, loss, grads, depth, seed)


def grad_errors(
    model: nn.Module,
    x: torch.Tensor,
    target,
    *,
    bits: int,
    naive: bool = False,
    loss_fn: Callable = F.cross_entropy,
    exact: ExactRun | None = None,
    seed: int = 0,
    forward_rtol: float | None = None,
    **approx_kwargs,
) -> GradErrors:
    """Relative L2 error of every conv weight gradient of one approximate training step against exact.

    Args:
        model: the model (not modified: each run uses its own deep copy, in training mode).
        x, target: the batch; the loss is ``loss_fn(model(x), target)``.
        bits, naive, **approx_kwargs: passed to :func:`tritonact.approximate` (``window``,
            ``positive_fraction``, ``backend``, ...).
        exact: an :func:`exact_run` of the same model, batch and ``loss_fn`` to reuse (else one is made).
        seed: RNG seed both runs start from (dropout).
        forward_rtol: if given, raise ``AssertionError`` when the output or loss relative difference exceeds it
            (the exact-forward guarantee; leave None for ``naive=True``, whose forward is approximate).

    Returns:
        :class:`GradErrors`: ``(name, depth, error)`` per conv weight in forward execution order, with
        ``output_rel_diff`` and ``loss_rel_diff``.
    """
    from tritonact.approx import approximate

    if exact is None:
        exact = exact_run(model, x, target, loss_fn=loss_fn, seed=seed)
    m = copy.deepcopy(model)
    convs = _conv_weights(m)
    with approximate(m, bits=bits, naive=naive, **approx_kwargs):
        out, loss = _step(m, x, target, loss_fn, exact.seed)
    res = GradErrors()
    for name, g_exact in sorted(exact.grads.items(), key=lambda kv: exact.depth[kv[0]]):
        g = convs[name].weight.grad
        if g is None:
            raise AssertionError(f"{name} got no gradient under approximate() but did in exact training")
        res.append((name, exact.depth[name], rel_l2(g, g_exact)))
    res.output_rel_diff = rel_l2(out, exact.output)
    res.loss_rel_diff = rel_l2(loss, exact.loss)
    if forward_rtol is not None:
        if not (res.output_rel_diff <= forward_rtol and res.loss_rel_diff <= forward_rtol):
            raise AssertionError(
                f"forward differs from exact: output {res.output_rel_diff:.3g}, loss {res.loss_rel_diff:.3g} "
                f"(relative; tolerance {forward_rtol:g})"
            )
    return res
