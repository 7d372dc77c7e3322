"""Measuring what training holds: bytes saved for backward, and the peak of a whole training step."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["SavedTensorCounter", "saved_bytes", "activation_bytes_per_sample", "peak_memory"]

_ACTIVE = threading.local()  # .counters: the SavedTensorCounters open on this thread


def note_saved(t) -> None:
    """Tell the open counters about a tensor autograd keeps. The generic path (``tritonact.saved``) calls it: its
    hooks sit inside the counter's, so the counter sees the codes it keeps instead of the tensors they code."""
    for c in getattr(_ACTIVE, "counters", ()):
        c._pack(t)


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
        _ACTIVE.counters = (*getattr(_ACTIVE, "counters", ()), self)
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        _ACTIVE.counters = tuple(c for c in getattr(_ACTIVE, "counters", ()) if c is not self)
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


def activation_bytes_per_sample(
    model: nn.Module,
    make_input: Callable[[int], torch.Tensor],
    batch_sizes: tuple[int, int] = (2, 4),
    loss_fn: Callable | None = None,
) -> float:
    """Slope of :func:`saved_bytes` between two batch sizes: what one more sample costs (constants cancel)."""
    a, b = batch_sizes
    if not 0 < a < b:
        raise ValueError(f"batch_sizes must be two increasing positive ints, got {batch_sizes!r}")
    sa = saved_bytes(model, make_input(a), loss_fn)
    sb = saved_bytes(model, make_input(b), loss_fn)
    model.zero_grad(set_to_none=True)
    return (sb - sa) / (b - a)


# ----------------------------------------------------------------------------------------------------------
# peak memory of a whole training step

# (our key, MemTracker's category): MemTracker's ``_MemRefType`` values, in the order a report lists them.
_CATEGORIES = (
    ("parameters", "Parameter"),
    ("buffers", "Buffer"),
    ("gradients", "Gradient"),
    ("activations", "Activation"),
    ("temporaries", "Temp"),
    ("optimizer", "Optstate"),
    ("other", "Other"),
)


def peak_memory(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None = None,
    loss_fn: Callable | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Run one training step of ``model`` on ``x`` and return its peak memory, split by what holds it.

    The step is real: forward, loss, backward and, when ``optimizer`` is given, ``optimizer.step()``; parameters,
    BatchNorm statistics and optimizer state change as in training. Gradients are released at the end (set to
    ``None``), so repeated calls measure the same step. Works inside :func:`tritonact.approximate`.

    On CPU the numbers come from ``torch.distributed._tools.mem_tracker.MemTracker``, which sees every tensor the
    step allocates: *activations* are tensors made in the forward pass, *temporaries* those made in the backward
    pass. On CUDA they come from the caching allocator (``torch.cuda.max_memory_allocated``): parameters, buffers,
    gradients and optimizer state are counted from the tensors, *activations* is what the forward pass left
    allocated, and *temporaries* is the rest of the peak.

    Args:
        model: the ``nn.Module`` to step (its mode is left as is: call ``model.train()`` first).
        x: the input batch, e.g. ``(N, C, H, W)``, on the model's device.
        target: labels for the loss, e.g. ``(N,)`` class indices. Default ``None``.
        loss_fn: ``loss_fn(output, target)`` (or ``loss_fn(output)`` without a target) returning a scalar.
            Default: cross-entropy with a target, the mean square of the output without one.
        optimizer: stepped after the backward pass when given (its state counts as ``optimizer``). Default ``None``.

    Returns:
        A dict of bytes (ints): ``parameters``, ``buffers``, ``gradients``, ``activations``, ``temporaries``,
        ``optimizer``, ``other`` (the input batch and anything else registered) at the moment of the peak, and
        ``total`` (their sum, the peak itself); ``activations_after_forward``: what the forward pass left
        allocated for backward; ``activations_temporaries_peak``: the most that activations and temporaries held
        together at any moment of the step (on CUDA a lower bound: all gradients are taken as allocated at the
        backward's peak). Also ``device`` and ``method`` (``"memtracker"`` or ``"cuda"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if target is not None and not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {loss_fn!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device != x.device:
            raise ValueError(f"x is on {x.device} but the model has tensors on {t.device}")
        break
    if target is not None and target.device != x.device:
        raise ValueError(f"target is on {target.device} but x is on {x.device}")

    def loss_of(out):
        if loss_fn is not None:
            return loss_fn(out) if target is None else loss_fn(out, target)
        if target is not None:
            return torch.nn.functional.cross_entropy(out, target)
        return _default_loss(out)

    with torch.enable_grad():
        if x.device.type == "cuda":
            return _peak_cuda(model, x, loss_of, optimizer)
        return _peak_memtracker(model, x, target, loss_of, optimizer)


def _release_grads(model: nn.Module, optimizer) -> None:
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


def _peak_memtracker(model, x, target, loss_of, optimizer) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    class _Tracker(MemTracker):
        # MemTracker keeps the breakdown at the moment of the total's peak; also keep the highest activations +
        # temporaries, which the peak moment understates once gradients dominate (codes make activations small).
        act_temp_peak = 0

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            snap = getattr(self, "_curr_mem_snap", {}).get(x.device, {})
            self.act_temp_peak = max(self.act_temp_peak, snap.get("Activation", 0) + snap.get("Temp", 0))

    mt = _Tracker()
    external = [model, x] + ([target] if target is not None else []) + ([optimizer] if optimizer is not None else [])
    mt.track_external(*external)
    with mt:
        out = model(x)
        loss = loss_of(out)
        after_forward = mt.get_tracker_snapshot("current").get(x.device, {}).get("Activation", 0)
        loss.backward()
        del out, loss
        if optimizer is not None:
            optimizer.step()
        _release_grads(model, optimizer)
    peak = mt.get_tracker_snapshot("peak").get(x.device, {})
    # keys are _MemRefType members (a str Enum) plus "Total"; key by the plain category name
    peak = {getattr(k, "value", k): v for k, v in peak.items()}
    result = {ours: int(peak.get(theirs, 0)) for ours, theirs in _CATEGORIES}
    result["total"] = sum(result.values())
    result["activations_after_forward"] = int(after_forward)
    result["activations_temporaries_peak"] = int(max(mt.act_temp_peak, result["activations"] + result["temporaries"]))
    result["device"] = str(x.device)
    result["method"] = "memtracker"
    return result


def _tensor_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _optimizer_state(optimizer):
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _peak_cuda(model, x, loss_of, optimizer) -> dict:
    dev = x.device
    params = list(model.parameters())
    p_bytes = _tensor_bytes(params)
    b_bytes = _tensor_bytes(model.buffers())
    g_before = _tensor_bytes(p.grad for p in params if p.grad is not None)
    o_before = _tensor_bytes(_optimizer_state(optimizer))
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)

    torch.cuda.reset_peak_memory_stats(dev)
    out = model(x)
    loss = loss_of(out)
    torch.cuda.synchronize(dev)
    after_forward = torch.cuda.memory_allocated(dev) - base
    fwd_peak = torch.cuda.max_memory_allocated(dev)

    torch.cuda.reset_peak_memory_stats(dev)
    loss.backward()
    del out, loss
    torch.cuda.synchronize(dev)
    bwd_peak = torch.cuda.max_memory_allocated(dev)
    g_after = _tensor_bytes(p.grad for p in params if p.grad is not None)

    opt_peak = 0
    if optimizer is not None:
        torch.cuda.reset_peak_memory_stats(dev)
        optimizer.step()
        torch.cuda.synchronize(dev)
        opt_peak = torch.cuda.max_memory_allocated(dev)
    o_after = _tensor_bytes(_optimizer_state(optimizer))
    _release_grads(model, optimizer)

    peak = max(fwd_peak, bwd_peak, opt_peak)
    result = {
        "parameters": p_bytes,
        "buffers": b_bytes,
        "gradients": max(g_before, g_after),
        "optimizer": max(o_before, o_after),
        "other": max(base - p_bytes - b_bytes - g_before - o_before, 0),
    }
    rest = max(peak - sum(result.values()), 0)
    result["activations"] = min(max(after_forward, 0), rest)
    result["temporaries"] = rest - result["activations"]
    result = {ours: int(result[ours]) for ours, _ in _CATEGORIES}
    result["total"] = sum(result.values())
    result["activations_after_forward"] = int(max(after_forward, 0))
    grads_new = max(g_after - g_before, 0)
    result["activations_temporaries_peak"] = int(max(fwd_peak - base, bwd_peak - base - grads_new, 0))
    result["device"] = str(dev)
    result["method"] = "cuda"
    return result
