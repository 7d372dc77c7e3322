"""Outliers: a few values far outside a channel's distribution keep their exact value beside the code.

One extreme value (a hot pixel, a corrupted sample, an activation spike) inflates its channel's batch variance, so
the per-channel window (``window`` standard deviations, ``tritonact.config``) stretches over it: the bulk of the
values falls into a few levels and the outlier itself is clipped into the end bin, where it also drags that bin's
centroid. Both errors reach the weight gradients: resnet18, 4 bits, 8 samples of 64x64, one pixel of one sample set
to 100 in every input channel: conv weight gradient median error 0.28 against 0.10 clean (docs/method.md
"Outliers").

So the grid (``reference.code_params``) flags a channel whose observed range reaches more than
:data:`THRESHOLD` standard deviations from its mean (row ``"out"`` of ``P``; a normal variable does so with
probability ~1e-15; a generic code, ``tritonact.saved``, needs :data:`GENERIC_THRESHOLD`). A code with a flagged
channel is coded again here, in the same format (the statistics by the backend's ``robust_stats``, the codes and
centroid table by its ``encode``: the compiled graphs on the CPU path, the reference elsewhere), every channel with:

1. **robust statistics**: mean and std of each channel over its values within :data:`CLIP` standard deviations
   of the last estimate (the plain one first, :data:`ROUNDS` rounds), so the window fits the bulk again; from the
   batch's first samples holding :data:`ROBUST_VALUES` values per channel;
2. **escapes**: every value outside that window and more than :data:`ESCAPE` robust standard deviations from the
   robust mean (at most one per :data:`CAP` values, the furthest out first) is stored exactly, as a row ``(flat
   index in memory order, value)`` of a float64 ``(E, 2)`` tensor ``esc``; the values between clip into the end
   bins as usual;
3. the codes of the other values on the robust grid, with the escaped ones left out of the centroid statistics
   (which see the samples a unit's own see, ``centroids.sample_limit``).

Decoding puts the escaped values back (``escapes.apply_``): their decoded value, mask and activation are exact. A
convolution's input is decoded by the backend's own decoder and the escaped elements' activations written over it
(``escapes.apply_act_``, ``Backend.decode``); the unit backward of a code with escapes runs the backend's own with
the escaped elements' share corrected (``tritonact.escaped``). Without them (``esc`` has no rows, the normal case)
nothing changes and no backend pays anything but the flag row.
"""

from __future__ import annotations

import math

import torch

from tritonact import centroids, escapes
from tritonact import reference as ref
from tritonact.quant import memory_order

__all__ = ["THRESHOLD", "GENERIC_THRESHOLD", "CLIP", "ROUNDS", "ESCAPE", "CAP", "flagged", "far", "encode_ref",
           "robust_stats_ref", "recode"]  # fmt: skip

THRESHOLD = ref.OUTLIER_SIGMAS  # a channel is flagged beyond this many standard deviations from its mean
CLIP = 4.0  # robust statistics over the values within this many standard deviations of the last estimate,
ROUNDS = 3  # this many times (an outlier sample's values leave the estimate over the rounds)
GENERIC_THRESHOLD = 12.0  # the same for a generic code, which is not normalized: a ReLU output's zeros put its
# ordinary tail at 6-8 std (tests/test_generic.py's net without BN reaches 7.2)
ESCAPE = 4.5  # a value is escaped beyond the window and beyond this many robust standard deviations
CAP = 16  # at most one escape per CAP values of a code (16 bytes each: at most one byte per value)
# The robust statistics and the centroid table of a recode see the batch's first samples holding at least this many
# values per channel (all of them where the batch is not the outermost dim in memory), as a unit's own centroid
# table does (centroids.VALUES); every value is still tested for escape and coded. A recode of resnet50's layer1 at
# 16 x 128x128 (4M values) went through all of them some 35 times; training on one batch at lr 0.01 (the step-time
# benchmark) recodes about half of the units after a few steps.
ROBUST_VALUES = 1 << 12


def flagged(P: torch.Tensor | None) -> bool:
    """Whether a grid has a channel with outliers (a host sync on a GPU: one per coded tensor)."""
    return P is not None and P.numel() > 0 and bool(P[ref.R["out"]].any())


def far(w: torch.Tensor, sigmas: float = GENERIC_THRESHOLD) -> bool:
    """Whether some channel of ``w`` has a value more than ``sigmas`` standard deviations from its mean."""
    wmin, wmax, mean, std = _stats(w, "sum")
    return bool((torch.maximum(wmax - mean, mean - wmin) > sigmas * std).any())


def _stats(w: torch.Tensor, coded: str):
    """``reference.value_stats`` in two passes: ``torch.var_mean``'s CPU kernel is ~170x slower than a sum over
    NCHW's non-channel dims (6.1 against 0.035 ms, ``(8, 256, 16, 16)``, one thread). The second pass holds a
    temporary of ``w``'s size, which a recode makes anyway (the units' own statistics keep ``var_mean``: no
    temporary in the forward)."""
    if coded == "xh":
        return ref.value_stats(w, coded)
    dims = ref.channel_dims(w)
    n = w.numel() // w.shape[1]
    mean = w.sum(dim=dims) / n
    std = ((w - ref.bview(mean, w)).square_().sum(dim=dims) / n).sqrt()
    return w.amin(dim=dims), w.amax(dim=dims), mean, std


def _robust(w: torch.Tensor, dims, mean: torch.Tensor, std: torch.Tensor):
    for _ in range(ROUNDS):  # (in place where it can be: each pass is a full-size tensor)
        keep = (w - ref.bview(mean, w)).abs_().le_(ref.bview(CLIP * std, w))  # 0/1 in w's dtype
        n = keep.sum(dim=dims).clamp(min=1.0)
        m = (w * keep).sum(dim=dims) / n
        var = (w - ref.bview(m, w)).square_().mul_(keep).sum(dim=dims) / n
        mean, std = m, var.sqrt().clamp(min=1e-12)
    return mean, std


def leading(shape, perm, values: int) -> int:
    """How many leading samples hold at least ``values`` values per channel: all of them where the batch is not the
    outermost dim in memory (no prefix of the codes is a set of samples there)."""
    if not perm or perm[0] != 0:
        return shape[0]
    return min(shape[0], max(1, -(-values // max(math.prod(shape[2:]), 1))))


def encode_ref(w: torch.Tensor, P: torch.Tensor, bits: int, act: str, bounds=None):
    """The packed codes of ``w`` under ``P``, whose centroid table (if it has one) is measured over the samples a
    unit's own table sees (``centroids.sample_limit``); a NaN value is code 0 and has no share in it
    (``Backend.encode``'s contract, the reference). ``bounds``: per-channel ``(lo, hi)``; the values outside them
    are coded as NaN too, and ``(codes, outside)`` comes back, ``outside`` a flat bool mask in memory order."""
    outside = None
    if bounds is not None:
        outside = (w < ref.bview(bounds[0], w)) | (w > ref.bview(bounds[1], w))
        w = w.clone().masked_fill_(outside, math.nan)  # (the out-of-place masked_fill drops channels_last)
    cent = centroids.has_table(P, ref.PARAM_ROWS)
    acc = centroids.new_acc(bits, w.shape[1], w.device) if cent else None
    perm = memory_order(w)
    S = centroids.sample_limit(tuple(w.shape), perm, bits)
    data = ref.encode_ref(w, P, bits, act, acc, S)
    if cent:
        centroids.finish_(P, acc, ref.PARAM_ROWS)
    return data if outside is None else (data, outside.permute(perm).reshape(-1))


def robust_stats_ref(w: torch.Tensor, head: torch.Tensor, coded: str):
    """``(wmin, wmax, mean, std)`` per channel: the range of ``w``, the robust statistics of ``head`` (its first
    samples, or ``w`` itself; steps 1 of the module docstring). ``Backend.robust_stats``' contract, the reference."""
    dims = ref.channel_dims(w)
    if head.shape[0] == w.shape[0]:
        wmin, wmax, mean, std = _stats(w, coded)
    else:  # the range from every value, the statistics from the first samples
        wmin, wmax = w.amin(dim=dims), w.amax(dim=dims)
        mean, std = _stats(head, coded)[2:]
    mean, std = _robust(head, dims, mean, std)
    return wmin, wmax, mean, std


def recode(w: torch.Tensor, *, bits: int, act: str, coded: str, gamma, beta, window: float, pf, cent: bool,
           edge: float = -1.0, encode=encode_ref, stats=robust_stats_ref):  # fmt: skip
    """``(data, P, esc)``: the code of ``w`` (fp32, dense in its memory order, channels at dim 1) on robust
    per-channel statistics, with the values outside the window escaped (see the module docstring); every channel,
    as an outlier sample leaves channels its values do not flag inflated too. ``coded``, ``gamma``, ``beta``,
    ``window``, ``pf``, ``edge``: as ``reference.code_params``; ``cent``: with a centroid table (measured as a unit's
    own); ``encode`` and ``stats``: the backend's steps, :func:`encode_ref` and :func:`robust_stats_ref` or a
    backend's ``encode`` and ``robust_stats``."""
    perm = memory_order(w)
    head = w[: leading(tuple(w.shape), perm, ROBUST_VALUES)]
    wmin, wmax, mean, std = stats(w, head, coded)
    half = window * std if not math.isinf(window) else torch.full_like(std, math.inf)
    lo, hi = torch.maximum(wmin, mean - half), torch.minimum(wmax, mean + half)
    flat = w.permute(perm).reshape(-1)  # memory order (w is dense in it)
    reach = ESCAPE * std  # beyond the window and this: escaped (between them: clipped into the end bins)
    elo, ehi = torch.minimum(lo, mean - reach), torch.maximum(hi, mean + reach)
    P = ref.code_params(bits=bits, act=act, wmin=lo, wmax=hi, wmean=mean, wstd=std, gamma=gamma, beta=beta,
                        coded=coded, window=window, positive_fraction=pf, centroids=cent, edge=edge)  # fmt: skip
    P[ref.R["out"]] = 0.0
    # the values outside (elo, ehi) coded as NaN (code 0, no share in the centroid statistics), in the same pass
    data, outside = encode(w, P, bits, act, bounds=(elo, ehi))
    idx = outside.nonzero().squeeze(1)
    cap = max(1, w.numel() // CAP)
    if idx.numel() > cap:  # the furthest out first, in the window's own units; the others coded on the grid
        c = escapes.channel_of(idx, w.shape, perm)
        excess = torch.maximum(lo[c] - flat[idx], flat[idx] - hi[c]) / std[c]
        idx = idx[excess.topk(cap).indices].sort().values
        w_enc = w.clone()
        w_enc.permute(perm).reshape(-1)[idx] = math.nan
        data = encode(w_enc, P, bits, act)
    vals = flat[idx]
    esc = torch.stack([idx.double(), vals.double()], dim=1)
    return data, P, esc
