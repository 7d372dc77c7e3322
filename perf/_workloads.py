"""What the benchmarks run: kernel cases with the bytes they must move, torchvision training steps in each mode,
and the max-batch search. How they are timed and measured is perf/_util.py.

Bytes a kernel must move (``N`` elements of ``e`` bytes each, ``b`` bits per code, ``K = ceil(N * b / 8)`` bytes of
codes; the per-channel vectors are negligible)::

    quantize        N*e read + K written
    dequantize      K read + N*e written
    decode_act      K read + N*e written                   (a~ of a unit, what the next conv consumed)
    bn_stats        N*e read                               (per-channel statistics of y, two-stage reduction)
    bn_act_fwd      N*e read + N*e written + K written     (normalize, activate, write out and codes in one pass)
    unit_forward    2*N*e read + N*e written + K written   (bn_stats, then bn_act_fwd: BN needs the statistics
                                                            before the first output, so y is read twice)
    unit_backward   2*(N*e + K) read + N*e written         (a pass for the per-channel sums of g_z and g_z*xh, then
                                                            one for g_y: g and the codes are read twice)

On CUDA tensors the Triton launchers of ``tritonact.kernels`` run; on CPU the torch path (``tritonact.quantize``'s
torch backend, ``tritonact.backends.TorchBackend.bn_act`` and ``tritonact.reference``), which has no separate statistics
or fused-pass launcher.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import tritonact
from tritonact import backends
from tritonact import reference as ref
from tritonact.config import ApproxConfig
from tritonact.memory import activation_bytes_per_sample, peak_memory
from tritonact.quant import memory_order

from ._util import MiB, is_cuda, memory_budget, sync

# ----------------------------------------------------------------------------------------------------------
# kernels

KERNELS = ("quantize", "dequantize", "decode_act", "bn_stats", "bn_act_fwd", "unit_forward", "unit_backward")
GPU_ONLY = ("bn_stats", "bn_act_fwd")  # Triton launchers; the CPU path only has whole-unit functions


@dataclass
class KernelCase:
    name: str
    bits: int
    shape: tuple
    dtype: torch.dtype
    fn: Callable  # no arguments; inputs allocated already
    nbytes: int  # bytes it must move (module docstring)


def kernel_case(
    name: str, bits: int, shape, device, dtype=torch.float32, channels_last: bool = False, backend: str | None = None
) -> KernelCase:
    """Inputs of kernel ``name`` at ``shape`` (activations ``(N, C, H, W)``) and a call of it on ``device``.

    ``backend``: ``"triton"`` (the launchers of ``tritonact.kernels``; on CPU tensors only under
    ``TRITON_INTERPRET=1``), ``"torch"``, or None: Triton on CUDA, torch on CPU."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; one of {KERNELS}")
    backend = backend or ("triton" if is_cuda(device) else "torch")
    if name in GPU_ONLY and backend != "triton":
        raise ValueError(f"{name} is a Triton launcher: no torch backend")
    g = torch.Generator(device=device).manual_seed(0)
    C = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = (torch.randn(shape, generator=g, device=device) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    n, e = y.numel(), y.element_size()
    codes = (n * bits + 7) // 8

    if name in ("quantize", "dequantize"):
        lo = torch.full((C,), -3.0, device=device)
        step = torch.full((C,), 6.0 / (1 << bits), device=device)
        if name == "quantize":
            return KernelCase(
                name,
                bits,
                tuple(shape),
                dtype,
                lambda: tritonact.quantize(y, bits, lo, step, backend=backend),
                n * e + codes,
            )
        p = tritonact.quantize(y, bits, lo, step, backend=backend)
        return KernelCase(
            name, bits, tuple(shape), dtype, lambda: tritonact.dequantize(p, backend=backend), codes + n * e
        )

    bn = nn.BatchNorm2d(C).to(device)
    cfg = ApproxConfig(bits=bits, backend=backend)
    be = backends.get(backend)
    gamma = torch.rand(C, generator=g, device=device) + 0.5
    beta = torch.randn(C, generator=g, device=device) * 0.2
    perm = memory_order(y)
    rm, rv = bn.running_mean, bn.running_var
    forward = lambda: be.bn_act(  # noqa: E731
        y, gamma, beta, None, rm, rv, 0.1, bn.eps, bits=bits, act="relu", window=cfg.effective_window,
        pf=cfg.positive_fraction_for(y.numel() // C), store_xh=False,
    )  # fmt: skip
    if backend == "triton":
        from tritonact.kernels import bn_act as K
        from tritonact.kernels import bn_act_bwd

        backward, decode = bn_act_bwd.unit_backward, K.decode_act
    else:
        backward, decode = ref.unit_backward_ref, ref.decode_act_ref
    with torch.no_grad():
        out, data, P, invstd = forward()[:4]
    case = lambda fn, nbytes: KernelCase(name, bits, tuple(shape), dtype, fn, nbytes)
    if name == "unit_forward":
        return case(forward, 3 * n * e + codes)
    if name == "decode_act":
        return case(lambda: decode(data, P, bits, tuple(shape), perm, "relu", dtype), codes + n * e)
    if name == "unit_backward":
        grad = torch.randn(shape, generator=g, device=device).to(dtype).contiguous(memory_format=fmt)
        args = (grad, data, P, bits, tuple(shape), perm, "relu", gamma, beta, invstd)
        return case(lambda: backward(*args), 3 * n * e + 2 * codes)
    mean64, var64, _, _ = K.bn_stats_forward(y)
    if name == "bn_stats":
        return case(lambda: K.bn_stats_forward(y), n * e)
    mean = mean64.float()
    return case(lambda: K.bn_act_forward(y, None, mean, invstd, gamma, beta, P, None, bits, "relu"), 2 * n * e + codes)


# ----------------------------------------------------------------------------------------------------------
# training steps

MODES = ("exact", "8bit", "4bit", "2bit", "checkpoint")
STAGES = ("layer1", "layer2", "layer3", "layer4")
NUM_CLASSES = 10


def build_model(
    arch: str, device, channels_last: bool = False, seed: int = 0, blocks: tuple | None = None
) -> nn.Module:
    """A randomly initialised torchvision ``arch`` (10 classes) in training mode, the same weights for the same
    arguments. ``blocks``: residual blocks per stage instead of the architecture's own (``(1, 1, 1, 1)`` keeps
    every code path of resnet18/resnet50, BasicBlock or Bottleneck, downsampling joins, at a fraction of the cost:
    the smoke run's choice)."""
    model = copy.deepcopy(_initialised(arch, seed, tuple(blocks) if blocks else None)).to(device).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


@functools.cache
def _initialised(arch: str, seed: int, blocks: tuple | None) -> nn.Module:
    # torchvision's init of resnet50 takes seconds on a CPU: do it once per process, hand out copies
    import torchvision
    from torchvision.models import resnet

    torch.manual_seed(seed)
    if blocks is None:
        return getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)
    block = {"resnet18": resnet.BasicBlock, "resnet34": resnet.BasicBlock}.get(arch, resnet.Bottleneck)
    return resnet.ResNet(block, list(blocks), num_classes=NUM_CLASSES)


def make_batch(n: int, res: int, device, channels_last: bool = False, seed: int = 1):
    """A random batch ``(x, target)`` made on ``device`` (``x``: ``(n, 3, res, res)``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, 3, res, res, generator=g, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return x, torch.randint(0, NUM_CLASSES, (n,), generator=g, device=device)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def train_step(model, x, target, optimizer) -> None:
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _Checkpointed(nn.Module):
    """One stage under ``torch.utils.checkpoint`` (non-reentrant): only its input is kept for backward, and its
    forward runs again during the backward pass."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


@contextlib.contextmanager
def training_mode(model: nn.Module, mode: str, **approx_kwargs):
    """Train ``model`` in ``mode`` inside the block: ``exact``; ``8bit`` / ``4bit`` / ``2bit`` under
    ``tritonact.approximate`` (``approx_kwargs`` go to it, e.g. ``ring=True``); ``checkpoint``: each of layer1..layer4
    under ``torch.utils.checkpoint``. Yields the ``approximate`` context (or None)."""
    if mode == "exact":
        yield None
    elif mode.endswith("bit"):
        with tritonact.approximate(model, bits=int(mode[:-3]), **approx_kwargs) as ctx:
            yield ctx
    elif mode == "checkpoint":
        # The recomputation runs every checkpointed BatchNorm's forward a second time in training mode, so its
        # running statistics are updated twice per step (num_batches_tracked too): fine for timing and memory, but
        # not the same training as the other modes.
        inner = {name: getattr(model, name) for name in STAGES}
        try:
            for name, stage in inner.items():
                setattr(model, name, _Checkpointed(stage))
            yield None
        finally:
            for name, stage in inner.items():
                setattr(model, name, stage)
    else:
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")


def memory_info(model, x, target, optimizer, res: int, channels_last: bool = False) -> dict:
    """Activation memory per sample (bytes saved for backward, slope between batch 2 and 4) and the peak of one
    training step at ``x``'s batch (``tritonact.memory.peak_memory``), in MiB. Runs real training steps."""
    make = lambda n: make_batch(n, res, x.device, channels_last, seed=n)[0]
    act = activation_bytes_per_sample(model, make, batch_sizes=(2, 4))
    peak = peak_memory(model, x, target, optimizer=optimizer)
    info = {
        "act_mib_per_sample": round(act / MiB, 4),
        "peak_mib": round(peak["total"] / MiB, 2),
        "peak_method": peak["method"],
        "activations_after_forward_mib": round(peak["activations_after_forward"] / MiB, 2),
        "activations_temporaries_peak_mib": round(peak["activations_temporaries_peak"] / MiB, 2),
    }
    info["peak_breakdown_mib"] = {
        k: round(v / MiB, 2) for k, v in peak.items() if isinstance(v, int) and k not in ("total",)
    }
    return info


# ----------------------------------------------------------------------------------------------------------
# largest batch in a memory budget


def step_fits(model, mode: str, batch: int, res: int, budget: int, channels_last: bool = False) -> bool:
    """Does one training step of ``model`` in ``mode`` at ``batch`` fit in ``budget`` bytes (everything: weights,
    gradients, optimizer state, activations, temporaries)?

    CUDA: the allocator is capped at the budget (``memory_budget``, entered by the caller) and the step must neither
    raise ``torch.cuda.OutOfMemoryError`` nor peak above it (``max_memory_allocated``). CPU: the MemTracker peak of
    ``tritonact.memory.peak_memory``. A fresh optimizer and a fresh ``approximate`` context per probe, so no state
    sized for an earlier, larger batch (ring buffers) is carried over."""
    device = next(model.parameters()).device
    x = target = optimizer = None
    try:
        x, target = make_batch(batch, res, device, channels_last)
        optimizer = make_optimizer(model)
        with training_mode(model, mode):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                train_step(model, x, target, optimizer)
                sync(device)
                ok = torch.cuda.max_memory_allocated(device) <= budget
            else:
                ok = peak_memory(model, x, target, optimizer=optimizer)["total"] <= budget
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or a library's own out-of-memory error
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        ok = False  # leaving the handler drops the traceback, and with it the failed step's tensors
    del x, target, optimizer
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ok


def max_batch(fits: Callable[[int], bool], start: int = 8, cap: int = 4096, rel_tol: float = 1 / 32):
    """Largest batch ``b <= cap`` with ``fits(b)``, assuming fits is monotone: doubling from ``start`` (halving if
    ``start`` does not fit) to bracket it, then bisection until the bracket is within ``rel_tol`` of it (or 1).
    Returns ``(best, probes)``, ``probes`` a list of ``(batch, fitted)``; best is 0 when even batch 1 fails."""
    probes = []

    def probe(b):
        ok = bool(fits(b))
        probes.append((b, ok))
        return ok

    lo, hi = 0, None  # lo fits (0: nothing yet), hi does not
    b = max(1, min(start, cap))
    if probe(b):
        lo = b
        while lo < cap:
            b = min(lo * 2, cap)
            if not probe(b):
                hi = b
                break
            lo = b
        if hi is None:
            return lo, probes
    else:
        hi = b
        while hi > 1:
            b = hi // 2
            if probe(b):
                lo = b
                break
            hi = b
        if lo == 0:
            return 0, probes
    while hi - lo > max(1, int(lo * rel_tol)):
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


def max_batch_in_budget(
    arch: str,
    mode: str,
    budget: int,
    res: int,
    device,
    channels_last: bool = False,
    start: int = 8,
    cap: int = 4096,
    blocks: tuple | None = None,
    rel_tol: float = 1 / 32,
) -> dict:
    """``max_batch`` of a fresh ``arch`` training in ``mode`` under ``budget`` bytes."""
    model = build_model(arch, device, channels_last, blocks=blocks)
    with memory_budget(budget, device):
        best, probes = max_batch(lambda b: step_fits(model, mode, b, res, budget, channels_last), start, cap, rel_tol)
    # a batch reported as cap may not be the largest that fits: the caller set the cap
    return {"mode": mode, "max_batch": best, "budget_mib": round(budget / MiB, 1), "res": res, "probes": probes}
