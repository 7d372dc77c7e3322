"""Measuring what training holds: bytes saved for backward, and the peak of a whole training step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["SavedTensorCounter", "saved_bytes", "activation_bytes_per_sample"]


class SavedTensorCounter:
    """Counts the bytes autograd keeps for backward while active, each storage once.

    A ``torch.autograd.graph.saved_tensors_hooks`` pair that records every tensor an op saves (ours go through
    ``save_for_backward`` too). Parameters can be excluded, so the count is what grows with the batch.

    Example::

        with SavedTensorCounter(exclude=model.parameters()) as c:
            loss = model(x).sum()
        print(c.nbytes)
    """

    def __init__(self, exclude=()):
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen: dict = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta":
            key = _storage_key(t)
            if key not in self._exclude:
                self._seen[key] = t.untyped_storage().nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device, s.data_ptr(), s.nbytes())


def saved_bytes(model: nn.Module, x: torch.Tensor, loss_fn: Callable | None = None) -> int:
    """Bytes saved for backward by one forward of ``model`` on ``x`` (parameters excluded). Runs the backward
    too, so nothing is left behind."""
    with SavedTensorCounter(exclude=list(model.parameters())) as c:
        out = model(x)
        loss = loss_fn(out) if loss_fn is not None else _default_loss(out)
    loss.backward()
    return c.nbytes


def _default_loss(out):
    if isinstance(out, torch.Tensor):
        return out.float().square().mean()
    if isinstance(out, (tuple, list)):
        return sum(_default_loss(o) for o in out)
    if hasattr(out, "_fields"):
        return sum(_default_loss(o) for o in out)
    raise TypeError(f"cannot build a loss from a model output of type {type(out).__name__}")


def activation_bytes_per_sample(model: nn.Module, make_input: Callable[[int], torch.Tensor],
                                batch_sizes: tuple[int, int] = (2, 4), loss_fn: Callable | None = None) -> float:
    """Slope of :func:`saved_bytes` between two batch sizes: what one more sample costs (constants cancel)."""
    a, b = batch_sizes
    if not 0 < a < b:
        raise ValueError(f"batch_sizes must be two increasing positive ints, got {batch_sizes!r}")
    sa = saved_bytes(model, make_input(a), loss_fn)
    sb = saved_bytes(model, make_input(b), loss_fn)
    model.zero_grad(set_to_none=True)
    return (sb - sa) / (b - a)
