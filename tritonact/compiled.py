"""The CPU path's per-unit work, compiled: the torch reference's formulas fused by TorchInductor's C++ backend.

In eager PyTorch a unit's forward codes, its backward and the decode for a convolution's weight gradient each take
about ten elementwise passes over the activation plus a few dozen tiny per-channel ops; compiled, each is one or two
vectorized C++ loops. The formulas are those of :mod:`tritonact.reference` in the same operation order, compiled
without floating-point contraction (inductor's default), so given the same grid ``P`` the codes and decoded values
equal the reference bit for bit; per-channel statistics and backward sums differ from eager only in summation order.

Layout: a tensor dense in memory order ``perm`` is viewed as ``(outer, C, inner)`` (NCHW: ``(N, C, H*W)``,
channels_last: ``(N*H*W, C, 1)``) and per-channel ``(C,)`` vectors as ``(1, C, 1)``; codes are packed and unpacked
a machine word at a time (see ``_pack``). Shapes whose number of codes is not a multiple of the codes per word (8 at
4 bits, 4 at 2 bits) run the eager reference.

Each function is traced (``make_fx``, symbolic sizes) and compiled (``torch._inductor.standalone_compile``) per
static key (bits, activation, window, dtypes...), and called directly, without ``torch.compile``'s per-call
machinery (see :class:`tritonact.graphs.Graphs`): one graph serves a model's many shapes, and a shape outside the
conditions a graph was compiled under gets one of its own.

``ApproxConfig(compile=False)`` or ``TRITONACT_COMPILE=0`` turns compilation off (the eager reference runs). If
compiling fails (no C++ compiler, an unsupported torch), a warning says why once and the eager reference runs from
then on.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings

import torch

from tritonact import centroids, outliers
from tritonact import reference as ref
from tritonact.compiled_bodies import (  # noqa: F401 (tests use _encode3)
    _MAKERS,
    COUNT_UNIT,
    PACKED_VALUES,
    _encode3,
    _pv,
    by_channel,
)
from tritonact.graphs import Graphs
from tritonact.quant import _inverse
from tritonact.quant import memory_order as _perm_of

__all__ = ["enabled", "layout3", "forward_xh", "forward_sum", "encode", "robust_stats", "decode_act", "unit_backward",
           "pool_index"]  # fmt: skip

_R = ref.R
_CODES_PER_WORD = {8: 1, 4: 8, 2: 4}  # codes per packing word (see ``_pack``): a code count must be a multiple
_failed: str | None = None  # why compilation was given up, once it was
_ran: set = set()  # keys' graph sets (_Graphs) that have run once


def enabled(device: torch.device) -> bool:
    """Whether the compiled path can run for tensors on ``device`` (CPU only: the GPU has the Triton kernels)."""
    return device.type == "cpu" and _failed is None


@functools.lru_cache(maxsize=4096)
def layout3(shape, perm, bits: int) -> tuple[int, int, int] | None:
    """``(outer, C, inner)`` view of a tensor of logical ``shape`` dense in memory order ``perm``, or None where
    the word-level packing below does not apply: a number of codes not a multiple of the codes per packing word
    (8 at 4 bits, 4 at 2 bits), or a big-endian host."""
    if sys.byteorder != "little" or math.prod(shape) % _CODES_PER_WORD[bits]:
        return None
    pos = perm.index(1)
    return math.prod(shape[d] for d in perm[:pos]), shape[1], math.prod(shape[d] for d in perm[pos + 1 :])


def view3(x: torch.Tensor, perm, v3) -> torch.Tensor:
    """``x`` (dense in memory order ``perm``) viewed as ``v3``."""
    return x.permute(perm).view(v3)


def unview3(x3: torch.Tensor, shape, perm) -> torch.Tensor:
    """Inverse of :func:`view3`: the logical ``shape`` with memory order ``perm``."""
    return x3.view([shape[d] for d in perm]).permute(_inverse(perm))


@functools.cache
def _compiled(kind: str, *key) -> Graphs:
    return Graphs(f"{kind}{key}", _MAKERS[kind](*key))


def _rows(v3, bits: int) -> bool:
    """Whether codes can be packed along the last dim of ``v3`` (see :func:`_pack`)."""
    return v3[2] % _CODES_PER_WORD[bits] == 0


def _cls(v3, *tensors) -> tuple:
    """The part of a key a graph cannot take as a symbol: the input dtypes and which of the ``(outer, C, inner)``
    sizes are 1 (a symbolic trace specializes size-1 dims, and the compiled code asserts them). Each key then sees a
    single kind of input."""
    return tuple(n == 1 for n in v3) + tuple(t.dtype for t in tensors if t is not None)


def _call(kind: str, key: tuple, *args):
    """Run compiled ``kind`` for ``key``. Returns None (the caller runs the eager reference) once compilation has
    failed, or for an input this key does not compile a graph for (see :class:`tritonact.graphs.Graphs`)."""
    global _failed
    if _failed is not None:
        return None
    fn = _compiled(kind, *key)
    # parameters (a BN's gamma, beta) as plain tensors: the graphs compute values, not gradients
    args = tuple(a.detach() if a is not None and a.requires_grad else a for a in args)
    try:
        out = fn(*args)
        _ran.add(fn)
        return out
    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the eager reference, loudly once
        if not _is_compile_error(e):
            raise
        _failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(
            f"tritonact: compiling the CPU path failed ({_failed}); the eager torch reference runs instead "
            "(set TRITONACT_COMPILE=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _is_compile_error(e: Exception) -> bool:
    mod = type(e).__module__
    torch_parts = ("torch._dynamo", "torch._inductor", "torch.fx", "torch._subclasses", "torch._functorch")
    return mod.startswith(torch_parts) or isinstance(e, (OSError, ImportError))


# ----------------------------------------------------------------------------------------------------------
# entry points (None: not compiled here, run the reference)


def forward_xh(y, mean, invstd, gamma, beta, *, bits, act, window, pf, perm, centroids=False, edge=-1.0):
    v3 = layout3(tuple(y.shape), perm, bits)
    if v3 is None:
        return None
    key = (bits, act, window, pf, _rows(v3, bits), centroids, edge, *_cls(v3, y, gamma))
    out = _call("forward_xh", key, view3(y, perm, v3), mean, invstd, gamma, beta)
    if out is not None and centroids:
        _measure(out[1], y, perm, bits, "xh", act, mean, invstd)
    return out


def forward_sum(s, gamma, beta, *, bits, act, window, pf, perm, centroids=False, edge=-1.0):
    v3 = layout3(tuple(s.shape), perm, bits)
    if v3 is None:
        return None
    key = (bits, act, window, pf, _rows(v3, bits), centroids, edge, *_cls(v3, s, gamma))
    out = _call("forward_sum", key, view3(s, perm, v3), gamma, beta)
    if out is not None and centroids:
        _measure(out[1], s, perm, bits, "sum", act, gamma, gamma)
    return out


def encode(w, P, *, bits, act, perm, bounds=None):
    """``Backend.encode`` compiled: the codes of ``w`` (fp32, dense in ``perm``) under ``P`` and its centroid table
    (if it has one) from the samples a unit's own sees, NaN values left out; equal to ``outliers.encode_ref``'s
    (``bounds``: also the values outside them, whose mask comes back too)."""
    v3 = layout3(tuple(w.shape), perm, bits)
    if v3 is None:
        return None
    lo = hi = None
    if bounds is not None:
        lo, hi = (channel_strided(b) if by_channel(v3[2]) else b for b in bounds)  # (see channel_strided)
    key = (bits, act == "relu6", _rows(v3, bits), bounds is not None, *_cls(v3, w))
    out = _call("encode", key, view3(w, perm, v3), graph_params(P[: ref.PARAM_ROWS], v3), lo, hi)
    if out is None:
        return None
    data, outside = out if bounds is not None else (out, None)
    if _has_table(P):  # the table: over the first samples, the values outside the bounds left out
        x = w
        if outside is not None:
            S = centroids.sample_limit(tuple(w.shape), perm, bits)
            x = w[:S].clone().masked_fill_(unview3(outside, tuple(w.shape), perm)[:S] > 0, math.nan)
        _measure(P, x, perm, bits, "sum", act, P[0], P[0])
    return data if outside is None else (data, outside.reshape(-1))  # (fp32 0/1: its nonzero() is the same)


def robust_stats(w, head, coded):
    """``Backend.robust_stats`` compiled (``outliers.robust_stats_ref``'s formulas in one graph), or None."""
    perm = tuple(_perm_of(w))
    v3 = layout3(tuple(head.shape), perm, 8)
    if v3 is None:
        return None
    h3 = view3(head, perm, v3)
    if 1 < v3[2] < 8:  # rows of a few values: channels innermost is ~5x faster, a copy included ((8, 2048, 4))
        h3 = h3.transpose(1, 2).reshape(-1, v3[1], 1)
        v3 = h3.shape
    key = ("xh" if coded == "xh" else "sum", outliers.ROUNDS, outliers.CLIP, *_cls(v3, head))
    out = _call("robust_stats", key, h3)
    if out is None or head.shape[0] == w.shape[0]:
        return out
    dims = ref.channel_dims(w)
    return w.amin(dim=dims), w.amax(dim=dims), out[2], out[3]


def _measure(P, x, perm, bits, coded, act, mean, invstd, samples=None):
    """Fill the centroid table of ``P`` from ``x``'s first samples (``tritonact.centroids``): a compiled graph gives
    each element's bin and fixed-point offset a few samples at a time, ``torch.bincount`` sums them and counts them
    (integers in float64: exact in any order, so the table equals the reference's). Where a channel's statistics see
    at most ``PACKED_VALUES`` values (all but planes of > 16k values), one weighted ``bincount`` of ``f + COUNT_UNIT``
    does both (compiled_bodies): 1.2 ms against 2.0 for a weighted and a plain one on 1 M values, one thread. In
    channel-major bins two ``index_add_`` took 5.7 ns a value, and code-major bins 13.4 ns with the graph.
    ``samples``: how many leading samples (default ``centroids.sample_limit``'s)."""
    C, L = x.shape[1], 1 << bits
    S = centroids.sample_limit(tuple(x.shape), perm, bits) if samples is None else samples
    packed = S * math.prod(x.shape[2:]) <= PACKED_VALUES  # values per channel, over all chunks
    pos = perm.index(1)
    inner = math.prod(x.shape[d] for d in perm[pos + 1 :])
    GP = graph_params(P, (0, C, inner))  # (its layout depends on inner only)
    tot = None  # per bin (+ one for the excluded values): packed totals, or (sums, counts)
    for n0, n1, _, _ in ref.sample_chunks(tuple(x.shape), perm, 8):
        if n0 >= S:
            break
        xs = x[n0 : min(n1, S)]
        v3 = (math.prod(xs.shape[d] for d in perm[:pos]), C, inner)
        out = _call("centroid_stats", (bits, coded, act, *_cls(v3, xs)), view3(xs, perm, v3), GP, mean, invstd)
        if out is None:  # compilation failed since: the reference's statistics
            return _measure_ref(P, x, perm, bits, act, coded, mean, invstd, S)
        key, w = out
        if packed:
            t = torch.bincount(key, weights=w, minlength=L * C + 1)
        else:  # sums of f + COUNT_UNIT may pass 2**53: f alone (the excluded bin's sum is dropped), and the counts
            f = torch.bincount(key, weights=w - COUNT_UNIT, minlength=L * C + 1)
            t = torch.stack((f, torch.bincount(key, minlength=L * C + 1).double()))
        tot = t if tot is None else tot.add_(t)
    if tot is None:  # no samples
        tot = torch.zeros(L * C + 1 if packed else (2, L * C + 1), dtype=torch.float64, device=x.device)
    if packed:  # total = sum(f) + COUNT_UNIT * count, |sum(f)| < COUNT_UNIT / 2
        t = tot[: L * C]
        n = torch.floor(t / COUNT_UNIT + 0.5)
        acc = (t - n * COUNT_UNIT, n)
    else:
        acc = tot[:, : L * C]
    centroids.finish_(P, acc, ref.PARAM_ROWS, channel_major=by_channel(inner))  # (compiled_bodies' bin order)


def _measure_ref(P, x, perm, bits, act, coded, mean, invstd, S):
    w = x.float() if coded == "sum" else (x.float() - ref.bview(mean, x)) * ref.bview(invstd, x)
    acc = centroids.new_acc(bits, x.shape[1], x.device)
    ref.encode_ref(w, P, bits, act, acc, S)
    centroids.finish_(P, acc, ref.PARAM_ROWS)


def decode_act(data, P, bits, shape, perm, act, dtype):
    v3 = layout3(tuple(shape), perm, bits)
    if v3 is None:
        return None
    like3 = torch.empty((), dtype=torch.uint8, device=data.device).expand(v3)  # carries the shape only
    key = (bits, act, dtype, _has_table(P), _word_rows(v3, bits), *_cls(v3))
    a3 = _call("decode_act", key, words3(data, v3, bits), graph_params(P, v3), like3)
    return None if a3 is None else unview3(a3, shape, perm)


def unit_backward(
    g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual=None, xh_code=None, residual_code=None,
    inplace=False, extra=None,
):  # fmt: skip
    """``reference.unit_backward_ref``, compiled; ``residual_code`` ``(data, P, act)``: the residual given by its
    code (same shape, layout and bits), decoded inside the loop instead of first into an fp32 tensor. ``inplace``
    as in the reference (``g`` fp32 and dense in ``perm``). ``extra``: fp32 ``(2, C)`` added to ``(sum_gzxh,
    sum_gz)`` before the input gradient uses them (the returned sums are without it; ``tritonact.escaped``)."""
    v3 = layout3(tuple(shape), perm, bits)
    if v3 is None:
        return None
    r3 = xd = xP = None
    ract = None
    if xh_code is not None:
        mode, (xd, xP) = "xh", xh_code
    elif residual_code is not None:
        mode, (xd, xP, ract) = "rcode", residual_code
    elif residual is not None:
        mode, r3 = "residual", view3(_dense_like(residual, perm), perm, v3)
    else:
        mode = "plain"
    g3 = view3(_dense_like(g, perm), perm, v3)
    words = (words3(data, v3, bits), words3(xd, v3, bits) if xd is not None else None)
    xP = None if xP is None else graph_params(xP, v3)
    vecs = (gamma, beta, invstd) if not by_channel(v3[2]) else (channel_strided(t) for t in (gamma, beta, invstd))
    if extra is not None and by_channel(v3[2]):
        extra = extra.t().contiguous().t()  # (as graph_params: each row's per-channel values together)
    args = (g3, words[0], graph_params(P, v3), *vecs, r3, words[1], xP, extra)
    tables = (_has_table(P), xP is not None and _has_table(xP))
    key = (bits, act, mode, ract, inplace, tables, extra is not None, _word_rows(v3, bits), *_cls(v3, g, gamma, r3))
    out = _call("backward", key, *args)
    if out is None:
        return None
    g_y, g_gamma, g_beta, g_res = (unview3(t, shape, perm) if t is not None and t.dim() == 3 else t for t in out)
    if inplace:  # the graph wrote g_y (a join's g_z) into g
        g_y, g_res = (g, None) if mode == "plain" else (g_y, g)
    return g_y, g_gamma, g_beta, g_res


def graph_params(P: torch.Tensor, v3) -> torch.Tensor:
    """``P`` as the graphs that read it take it: where each ``(outer, C, inner)`` row holds one channel
    (:func:`compiled_bodies.by_channel`), stored channel-major (a ``(rows, C)`` view of a ``(C, rows)`` tensor).
    Inductor vectorizes a loop along the dim most of its loads are contiguous in; with ``P``'s rows contiguous
    along ``C`` it picked ``C`` and loaded codes and stored values 16 channels apart, element by element: a 4-bit
    decode of ``(8, 64, 1024)`` took 2.94 ms against 0.35 ms channel-major (one thread, same run). A channel's
    centroid table is then contiguous too."""
    return P.t().contiguous().t() if by_channel(v3[2]) else P


def channel_strided(v: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` vector as a view with stride 2 (the same values). Inductor vectorizes a loop along the dim most
    of its loads are contiguous in. In the second pass of a unit backward that returns ``g_y`` (not in place) the
    per-channel vectors it read (gamma, ``1/sigma`` and the two sums) outnumbered the activation-sized loads, so it
    loaded the gradient and stored ``g_y`` one channel (a whole row) apart: ``(16, 256, 32, 32)`` took 38.6 ms
    against 6.7 ms with this view, ``(16, 64, 32, 32)`` 9.8 against 1.7 (one thread, fresh compiles). The in-place
    variant, training's usual case, already ran along the row (6.6 and 1.7 ms)."""
    return v.new_empty((v.shape[0], 2))[:, 0].copy_(v)


def _has_table(P: torch.Tensor) -> bool:
    return centroids.has_table(P, ref.PARAM_ROWS)


def _aligned(data: torch.Tensor) -> torch.Tensor:
    """Packed codes starting on a word boundary (a slice of a sample range may not)."""
    return data if data.storage_offset() % 4 == 0 else data.clone()


def _word_rows(v3, bits: int) -> bool:
    """Whether the graphs read ``(outer, C, inner)`` codes as int32 words by rows (see :func:`words3`): 2-bit codes
    whose rows fill whole words. With torch 2.14.1 the byte path decodes 4- and 8-bit codes faster (one thread,
    (16, 1024, 8, 8) at 4 bits: decode 1.02 -> 0.90 ms, unit backward 1.83 -> 1.34; at 2 bits the words win,
    0.86 against 0.90 and 2.98 against 4.27 ms on (16, 256, 32, 32); docs/kernels.md)."""
    return bits == 2 and v3[2] % (32 // bits) == 0


def words3(data: torch.Tensor, v3, bits: int) -> torch.Tensor:
    """Packed codes of an ``(outer, C, inner)`` view as the graphs read them: an ``(outer, C, words)`` int32 view
    where each row fills whole int32 words (:func:`_word_rows`), else the flat bytes."""
    data = _aligned(data)
    if not _word_rows(v3, bits):
        return data
    return data.view(torch.int32).view(v3[0], v3[1], v3[2] * bits // 32)


def _dense_like(t: torch.Tensor, perm) -> torch.Tensor:
    """``t`` dense in memory order ``perm`` (a copy only if it is not already)."""
    tp = t.permute(perm)
    return t if tp.is_contiguous() else tp.contiguous().permute(_inverse(perm))


def pool_index(direction: str, t, in_shape, kernel, stride, padding, dilation):
    """``reference.local_index`` (``direction="local"``) or ``reference.global_index`` (``"global"``), compiled."""
    w_like = torch.empty((), dtype=torch.uint8, device=t.device).expand(in_shape[3])  # carries W only
    key = (
        direction,
        tuple(kernel),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        ref.index_dtype(in_shape),
        *_cls(t.shape, t),
    )
    return _call("pool_index", key, t, w_like)
