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

from tritonact import reference as ref
from tritonact.graphs import Graphs
from tritonact.quant import _inverse

__all__ = ["enabled", "layout3", "forward_xh", "forward_sum", "decode_act", "unit_backward", "pool_index"]

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


# ----------------------------------------------------------------------------------------------------------
# compiled bodies (closures over static settings; sizes are dynamic)


def _pv(t: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` vector viewed to broadcast against ``(outer, C, inner)``."""
    return t.view(1, -1, 1)


def _params(bits, act, coded, window, pf, wmin, wmax, wmean, wstd, gamma, beta):
    return ref.code_params(
        bits=bits,
        act=act,
        wmin=wmin,
        wmax=wmax,
        wmean=wmean,
        wstd=wstd,
        gamma=gamma,
        beta=beta,
        coded=coded,
        window=window,
        positive_fraction=pf,
    )


# Packing ``8 // bits`` codes per byte, LSB first, a machine word at a time: on a little-endian host the bytes of a
# word are consecutive elements, so an int64 word holds 8 one-byte 4-bit codes (an int32 word 4 one-byte 2-bit
# codes), and shifting its nibbles (crumbs) together packs them into 4 bytes (1 byte); the inverse spreads a packed
# word's fields back over a wider word's bytes. Word arithmetic vectorizes in inductor's C++ (int16 shifts and int16
# conversions do not); gathering adjacent elements into a byte does not. Wider words do more per loop iteration:
# 8 codes per int64 word packs and unpacks 2-3x faster than 4 per int32 word (measured on a 2-core x86 CPU).


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (one per element, each < 2**bits) packed along the last dim, whose size is a multiple of
    ``_CODES_PER_WORD[bits]`` -> packed bytes, flat. Given ``(outer, C, inner)`` codes (``inner`` a multiple), the
    encoder's loop stores one-byte codes and a second loop packs them; given a flat view, inductor either stores the
    encoder's fp32 values first or recomputes them per word (see ``_encode3``)."""
    if bits == 8:
        return q.reshape(-1)
    if bits == 4:
        w = q.view(torch.int64)
        o = w & 0x0F
        for k in range(1, 8):
            o = o | ((w >> (4 * k)) & (0x0F << (4 * k)))
        return o.to(torch.int32).view(torch.uint8).reshape(-1)
    w = q.view(torch.int32)
    return ((w & 0x03) | ((w >> 6) & 0x0C) | ((w >> 12) & 0x30) | ((w >> 18) & 0xC0)).to(torch.uint8).reshape(-1)


def _unpack(d: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed bytes (flat) -> uint8 codes, one per element, flat."""
    if bits == 8:
        return d
    if bits == 4:
        w = d.view(torch.int32).to(torch.int64)
        o = w & 0x0F
        for k in range(1, 8):
            o = o | ((w << (4 * k)) & (0x0F << (8 * k)))
        return o.view(torch.uint8)
    w = d.to(torch.int32)
    return ((w & 0x03) | ((w << 6) & 0x0300) | ((w << 12) & 0x030000) | ((w << 18) & 0x03000000)).view(torch.uint8)


def _encode3(w, P, bits, relu6, rows):
    """Packed codes of ``w`` (fp32 ``(outer, C, inner)``): the values of ``reference.encode_ref``, computed as the
    two-branch formula of the reference's module docstring with a select (a blend in vectorized C++, cheap here)
    instead of the reference's arithmetic masks. Each branch is the reference's expression where it is taken (small
    integers in fp32: exact) and both stay inside ``[0, 2**bits - 1]``; a NaN ``w`` takes the negative branch, where
    ``fmin`` (which returns its non-NaN operand) makes it code 0 as the reference's ``nan_to_num`` does. So the codes
    are identical (tested, edge values included). ``rows``: ``"words"`` (each row fills int32 words: returned as
    them, ``(outer, C, words)``), True (``inner`` is a multiple of the codes per packing word, see :func:`_pack`)
    or False."""
    p = lambda name: _pv(P[_R[name]])  # noqa: E731
    L1 = float((1 << bits) - 1)
    v = (w - p("o")) * p("sgn")
    nneg = p("nneg")
    q_pos = nneg + torch.minimum(torch.floor(v * p("rdp")), p("qtop") - nneg).clamp(min=0.0)
    q_neg = nneg - 1.0 - torch.fmin(torch.floor(-v * p("rdn")), nneg - 1.0)
    q = torch.where(v > 0, q_pos, q_neg)
    if relu6:
        q = torch.where(v >= p("vhi"), L1, q)
    if rows == "words":  # int32 words by rows, or-ed from int32 codes: no uint8 vector stores (see _unpack3)
        qi = q.to(torch.int32).reshape(q.shape[0], q.shape[1], -1, 32 // bits)
        o = qi[..., 0]
        for k in range(1, 32 // bits):
            o = o | (qi[..., k] << (bits * k))
        return o
    if rows:
        return _pack(q.to(torch.uint8), bits)
    # packed through a flat view: without an elementwise op between q and that view, inductor recomputes the whole
    # encoder for each packed word (8x slower, measured); with one (a no-op clamp here), it stores q and converts it
    # in the flat loop
    q = torch.fmin(torch.fmax(q, torch.zeros_like(q)), torch.full_like(q, L1))
    return _pack(q.to(torch.uint8).reshape(-1), bits)


def _unpack3(d: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words by rows (:func:`words3`) -> int32 codes ``(outer, C, inner)``, code ``k`` in bits ``[k * bits,
    (k + 1) * bits)``: no uint8 vector loads (inductor's partial ones made a decode ~7x slower; docs/kernels.md)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=d.device)
    q = (d.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(d.shape[0], d.shape[1], -1)


def _decode3(d, P, bits, act, v3):
    """``(v~, mask)`` (fp32, bool; shape ``v3``) of the packed codes ``d`` (flat bytes, or words by rows from
    :func:`words3`): ``reference._decode_v``'s formula."""
    if d.dim() == 3:  # int32 words by rows: no uint8 loads, and plain strides in the generated code
        q = _unpack3(d, bits).float()
    else:
        # d sliced to the length v3 implies (a no-op at run time): sizes derived from v3's, not from d's, give
        # inductor plain strides for the 3-D view below (from d's length it indexes with a divide per element);
        # the view's own size arithmetic still costs integer divisions per stored vector, which words3 avoids
        q = _unpack(d[: v3[0] * v3[1] * v3[2] * bits // 8], bits).view(v3).float()
    p = lambda name: _pv(P[_R[name]])  # noqa: E731
    t = q - p("nneg") + 0.5
    mask = t > 0
    v = t.clamp(max=0.0) * p("dn") + t.clamp(min=0.0) * p("dp")
    if act in (None, "relu6"):
        sat = q > p("qtop")
        v = torch.where(sat, p("vhi"), v)
        mask = mask & ~sat
    return v, mask


def _make_forward_xh(bits, act, window, pf, rows, *_cls):
    def forward_xh(y3, mean, invstd, gamma, beta):
        # xh is monotone in y: its range comes from y's (as in backends.TorchBackend._codes)
        xmin = (y3.amin(dim=(0, 2)).float() - mean) * invstd
        xmax = (y3.amax(dim=(0, 2)).float() - mean) * invstd
        zero = torch.zeros_like(xmin)
        P = _params(bits, act, "xh", window, pf, xmin, xmax, zero, zero + 1.0, gamma, beta)
        xh = (y3.float() - _pv(mean)) * _pv(invstd)
        return _encode3(xh, P, bits, act == "relu6", rows), P

    return forward_xh


def _make_forward_sum(bits, act, window, pf, rows, *_cls):
    def forward_sum(s3, gamma, beta):
        s = s3.float()
        # two passes (mean, then mean squared deviation): inductor's single-pass Welford var_mean is ~1.6x slower
        M = s.numel() // s.shape[1]
        mean = s.sum(dim=(0, 2)) / M
        var = (s - _pv(mean)).square().sum(dim=(0, 2)) / M
        P = _params(bits, act, "sum", window, pf, s.amin(dim=(0, 2)), s.amax(dim=(0, 2)), mean, var.sqrt(), gamma, beta)
        return _encode3(s, P, bits, act == "relu6", rows), P

    return forward_sum


def _decoded_act(d, P, bits, act, v3):
    """A unit's output decoded from its code (fp32, shape ``v3``): ``reference.decode_act_ref``'s formula."""
    v, _ = _decode3(d, P, bits, act, v3)
    if act != "none":
        v = v.clamp(min=0.0)
    return v * _pv(P[_R["A"]]) + _pv(P[_R["B"]])


def _make_decode_act(bits, act, dtype, *_cls):
    def decode_act(d, P, like3):
        return _decoded_act(d, P, bits, act, like3.shape).to(dtype)

    return decode_act


def _make_backward(bits, act, mode, ract, inplace, *_cls):
    """``mode``: "plain" (xh from the code), "residual" (xh = (s - r - beta) / gamma, ``r`` a tensor), "rcode" (the
    same with ``r`` decoded in-loop from its own code, activation ``ract``), "xh" (xh from a second code).
    ``inplace``: ``g_y`` (a join's ``g_z``) is written into ``g3`` (inductor stores into the input's buffer: no
    activation-sized temporary) and returned as None."""

    def unit_backward(g3, d, P, gamma, beta, invstd, r3, xd, xP):
        v, mask = _decode3(d, P, bits, act, g3.shape)
        g_z = g3.float()
        if act != "none":
            g_z = g_z * mask
        if mode == "xh":
            xv, _ = _decode3(xd, xP, bits, "none", g3.shape)
            xh = xv * _pv(xP[_R["sgn"]]) + _pv(xP[_R["o"]])
        else:
            xh = v * _pv(P[_R["sgn"]]) + _pv(P[_R["o"]])
            if mode in ("residual", "rcode"):
                r = r3.float() if mode == "residual" else _decoded_act(xd, xP, bits, ract, g3.shape)
                g_safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
                xh = (xh - r - _pv(beta)) / _pv(g_safe)
        sum_gz = g_z.sum(dim=(0, 2))
        sum_gzxh = (g_z * xh).sum(dim=(0, 2))
        M = g3.numel() // gamma.numel()
        g_y = (g_z - _pv(sum_gz / M) - xh * _pv(sum_gzxh / M)) * _pv(gamma * invstd)
        if not inplace:
            return g_y, sum_gzxh, sum_gz, (g_z if mode != "plain" else None)
        if mode == "plain":
            g3.copy_(g_y)
            return None, sum_gzxh, sum_gz, None
        g3.copy_(g_z)
        return g_y, sum_gzxh, sum_gz, None

    return unit_backward


def _make_pool_index(direction, kernel, stride, padding, dilation, dtype, *_cls):
    f = ref.local_index if direction == "local" else ref.global_index

    def pool_index(t, w_like):
        return f(t, (0, 0, 0, w_like.shape[0]), kernel, stride, padding, dilation, dtype)

    return pool_index


_MAKERS = {
    "forward_xh": _make_forward_xh,
    "forward_sum": _make_forward_sum,
    "decode_act": _make_decode_act,
    "backward": _make_backward,
    "pool_index": _make_pool_index,
}


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


def forward_xh(y, mean, invstd, gamma, beta, *, bits, act, window, pf, perm):
    v3 = layout3(tuple(y.shape), perm, bits)
    if v3 is None:
        return None
    key = (bits, act, window, pf, _rows_kind(v3, bits), *_cls(v3, y, gamma))
    return _bytes(_call("forward_xh", key, view3(y, perm, v3), mean, invstd, gamma, beta))


def forward_sum(s, gamma, beta, *, bits, act, window, pf, perm):
    v3 = layout3(tuple(s.shape), perm, bits)
    if v3 is None:
        return None
    key = (bits, act, window, pf, _rows_kind(v3, bits), *_cls(v3, s, gamma))
    return _bytes(_call("forward_sum", key, view3(s, perm, v3), gamma, beta))


def _rows_kind(v3, bits: int):
    """How the encoder packs: ``"words"`` (each row fills int32 words), True (rows of whole packing words, through
    uint8 codes) or False (a flat view)."""
    return "words" if _word_rows(v3, bits) else _rows(v3, bits)


def _bytes(out):
    """A forward graph's ``(codes, P)`` with the codes as flat bytes (int32 words by rows are viewed as them)."""
    return out if out is None or out[0].dtype == torch.uint8 else (out[0].view(torch.uint8).reshape(-1), out[1])


def decode_act(data, P, bits, shape, perm, act, dtype):
    v3 = layout3(tuple(shape), perm, bits)
    if v3 is None:
        return None
    like3 = torch.empty((), dtype=torch.uint8, device=data.device).expand(v3)  # carries the shape only
    a3 = _call("decode_act", (bits, act, dtype, _word_rows(v3, bits), *_cls(v3)), words3(data, v3, bits), P, like3)
    return None if a3 is None else unview3(a3, shape, perm)


def unit_backward(
    g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual=None, xh_code=None, residual_code=None,
    inplace=False,
):  # fmt: skip
    """``reference.unit_backward_ref``, compiled; ``residual_code`` ``(data, P, act)``: the residual given by its
    code (same shape, layout and bits), decoded inside the loop instead of first into an fp32 tensor. ``inplace``
    as in the reference (``g`` fp32 and dense in ``perm``)."""
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
    args = (g3, words[0], P, gamma, beta, invstd, r3, words[1], xP)
    out = _call("backward", (bits, act, mode, ract, inplace, _word_rows(v3, bits), *_cls(v3, g, gamma, r3)), *args)
    if out is None:
        return None
    g_y, g_gamma, g_beta, g_res = (unview3(t, shape, perm) if t is not None and t.dim() == 3 else t for t in out)
    if inplace:  # the graph wrote g_y (a join's g_z) into g
        g_y, g_res = (g, None) if mode == "plain" else (g_y, g)
    return g_y, g_gamma, g_beta, g_res


def _aligned(data: torch.Tensor) -> torch.Tensor:
    """Packed codes starting on a word boundary (a slice of a sample range may not)."""
    return data if data.storage_offset() % 4 == 0 else data.clone()


def _word_rows(v3, bits: int) -> bool:
    """Whether each row of ``(outer, C, inner)`` codes fills whole int32 words (see :func:`words3`)."""
    return v3[2] % (32 // bits) == 0


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
