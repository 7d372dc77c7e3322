"""The graphs :mod:`tritonact.compiled` traces and compiles: the torch reference's formulas, written as closures over
static settings (sizes are dynamic) for TorchInductor's C++ backend. ``_MAKERS`` maps a graph kind to its maker."""

from __future__ import annotations

import torch

from tritonact import centroids
from tritonact import reference as ref

_R = ref.R


def _pv(t: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` vector viewed to broadcast against ``(outer, C, inner)``."""
    return t.view(1, -1, 1)


def _params(bits, act, coded, window, pf, wmin, wmax, wmean, wstd, gamma, beta, cent=False, edge=-1.0):
    return ref.code_params(
        centroids=cent,
        edge=edge,
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
    are identical (tested, edge values included). ``rows``: True (``inner`` is a multiple of the codes per packing
    word, see :func:`_pack`) or False. (Or-ing int32 codes into int32 words by rows, as the decoders read them, was
    2-4.8x slower on rows of 16 and 64 values and 1.1-1.2x on rows of 1,024 with torch 2.14: inductor stores the
    codes and gathers each word's codes with scalar loads; docs/kernels.md.)"""
    L1 = float((1 << bits) - 1)
    v, q = _vq(w, P, bits, relu6)
    if rows:
        return _pack(q.to(torch.uint8), bits)
    # packed through a flat view: without an elementwise op between q and that view, inductor recomputes the whole
    # encoder for each packed word (8x slower, measured); with one (a no-op clamp here), it stores q and converts it
    # in the flat loop
    q = torch.fmin(torch.fmax(q, torch.zeros_like(q)), torch.full_like(q, L1))
    return _pack(q.to(torch.uint8).reshape(-1), bits)


def _vq(w, P, bits, relu6):
    """``(v, q)`` of ``w`` (fp32 ``(outer, C, inner)``): the coded value and the code, in fp32 (see _encode3)."""
    p = lambda name: _pv(P[_R[name]])  # noqa: E731
    v = (w - p("o")) * p("sgn")
    nneg = p("nneg")
    q_pos = nneg + torch.minimum(torch.floor(v * p("rdp")), p("qtop") - nneg).clamp(min=0.0)
    q_neg = nneg - 1.0 - torch.fmin(torch.floor(-v * p("rdn")), nneg - 1.0)
    q = torch.where(v > 0, q_pos, q_neg)
    if relu6:
        q = torch.where(v >= p("vhi"), float((1 << bits) - 1), q)
    return v, q


def _unpack3(d: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words by rows (:func:`words3`) -> int32 codes ``(outer, C, inner)``, code ``k`` in bits ``[k * bits,
    (k + 1) * bits)``: no uint8 vector loads (inductor's partial ones made a decode ~7x slower; docs/kernels.md)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=d.device)
    q = (d.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(d.shape[0], d.shape[1], -1)


def _decode3(d, P, bits, act, v3, table=False):
    """``(v~, mask)`` (fp32, bool; shape ``v3``) of the packed codes ``d`` (flat bytes, or words by rows from
    :func:`words3`): ``reference._decode_v``'s formula; ``table``: ``P`` has a centroid table."""
    if d.dim() == 3:  # int32 words by rows: no uint8 loads, and plain strides in the generated code
        q = _unpack3(d, bits)
        if table:
            return _decode3_table(q, P, act)
        q = q.float()
    else:
        # d sliced to the length v3 implies (a no-op at run time): sizes derived from v3's, not from d's, give
        # inductor plain strides for the 3-D view below (from d's length it indexes with a divide per element);
        # the view's own size arithmetic still costs integer divisions per stored vector, which words3 avoids
        q = _unpack(d[: v3[0] * v3[1] * v3[2] * bits // 8], bits).view(v3).float()
    if table:
        return _decode3_table(q.to(torch.int32), P, act)
    p = lambda name: _pv(P[_R[name]])  # noqa: E731
    t = q - p("nneg") + 0.5
    mask = t > 0
    v = t.clamp(max=0.0) * p("dn") + t.clamp(min=0.0) * p("dp")
    if act in (None, "relu6"):
        sat = q > p("qtop")
        v = torch.where(sat, p("vhi"), v)
        mask = mask & ~sat
    return v, mask


def _decode3_table(qi, P, act):
    """:func:`_decode3` for a grid with a centroid table: ``t = (q - nneg) + off[q]``, the step by the code's side."""
    p = lambda name: _pv(P[_R[name]])  # noqa: E731
    tab = P[ref.PARAM_ROWS :]  # (L, C); channel-major where a row holds one channel (compiled.graph_params): a
    # channel's entries in one cache line, not L rows 4 KiB apart (a (16, 1024, 8, 8) decode 9x slower than midpoints)
    L, C = tab.shape
    if L <= 16:
        off = _select(qi, [_pv(tab[k]) for k in range(L)])
    else:  # 8-bit codes: 255 selects cost more than the indexed load
        c = torch.arange(C, dtype=torch.int32, device=qi.device).view(1, -1, 1)
        off = tab.t().reshape(-1)[c * L + qi] if by_channel(qi.shape[2]) else tab.reshape(-1)[qi * C + c]
    q = qi.float()
    pos = q >= p("nneg")
    v = ((q - p("nneg")) + off) * torch.where(pos, p("dp"), p("dn"))
    mask = pos
    if act in (None, "relu6"):
        sat = q > p("qtop")
        v = torch.where(sat, p("vhi"), v)
        mask = mask & ~sat
    return v, mask


def by_channel(inner: int) -> bool:
    """Whether each row of an ``(outer, C, inner)`` view holds one channel's values (``inner > 1``; channels_last is
    ``(N*H*W, C, 1)``). There centroid tables and their statistics are laid out channel-major (a channel's
    ``2**bits`` entries together): the decoding graphs read ``compiled.graph_params``' copy, the statistics use
    bins ``c * 2**bits + q``."""
    return inner > 1


def _select(qi, rows):
    """``rows[qi]`` elementwise (``len(rows)`` a power of two), as a tree of selects on ``qi``'s bits: vector blends,
    where an indexed load from the table runs element by element (a 4-bit decode graph 3.4x slower than
    midpoints, with the tree 2.4x; one thread, (32, 64, 1024) codes)."""
    bit = 0
    while len(rows) > 1:
        hi = ((qi >> bit) & 1) == 1
        rows = [torch.where(hi, rows[k + 1], rows[k]) for k in range(0, len(rows), 2)]
        bit += 1
    return rows[0]


# centroid statistics: a counted element's bincount weight is its offset f (an integer, |f| <= 2**24) plus this, so a
# bin's total is sum(f) + COUNT_UNIT * count, exact in float64 and separable while the bin holds < 2**14 values
# (|sum(f)| < 2**38 = COUNT_UNIT / 2, the total < 2**53)
COUNT_UNIT = 2.0**39
PACKED_VALUES = (1 << 14) - 1


def _make_centroid_stats(bits, coded, act, *_cls):
    def centroid_stats(x3, P, mean, invstd):
        w = (x3.float() - _pv(mean)) * _pv(invstd) if coded == "xh" else x3.float()
        v, q = _vq(w, P, bits, act == "relu6")
        f, keep = centroids.contributions(v, q, {name: _pv(P[_R[name]]) for name in ref.ROWS})
        C = P.shape[1]
        chan = torch.arange(C, dtype=torch.int32, device=x3.device).view(1, -1, 1)
        # channel-major bins where a row holds one channel: a row's adds hit 2**bits neighbouring bins
        L = 1 << bits
        bin_ = chan * L + q.to(torch.int32) if by_channel(x3.shape[2]) else q.to(torch.int32) * C + chan
        key = torch.where(keep > 0, bin_, L * C)  # excluded: one bin past the end
        # each counted element weighs f + COUNT_UNIT, so that one weighted bincount sums and counts (compiled._measure)
        return key.reshape(-1), (f.double() + keep.double() * COUNT_UNIT).reshape(-1)

    return centroid_stats


def _make_forward_xh(bits, act, window, pf, rows, cent, edge, *_cls):
    def forward_xh(y3, mean, invstd, gamma, beta):
        # xh is monotone in y: its range comes from y's (as in backends.TorchBackend._codes)
        xmin = (y3.amin(dim=(0, 2)).float() - mean) * invstd
        xmax = (y3.amax(dim=(0, 2)).float() - mean) * invstd
        zero = torch.zeros_like(xmin)
        P = _params(bits, act, "xh", window, pf, xmin, xmax, zero, zero + 1.0, gamma, beta, cent, edge)
        xh = (y3.float() - _pv(mean)) * _pv(invstd)
        return _encode3(xh, P, bits, act == "relu6", rows), P

    return forward_xh


def _make_forward_sum(bits, act, window, pf, rows, cent, edge, *_cls):
    def forward_sum(s3, gamma, beta):
        s = s3.float()
        # two passes (mean, then mean squared deviation): inductor's single-pass Welford var_mean is ~1.6x slower;
        # each summed over the rows first (the loops run in memory order: (16, 64, 1024) 1.14 -> 0.77 ms)
        M = s.numel() // s.shape[1]
        mean = s.sum(dim=2).sum(dim=0) / M
        var = (s - _pv(mean)).square().sum(dim=2).sum(dim=0) / M
        lo, hi = s.amin(dim=2).amin(dim=0), s.amax(dim=2).amax(dim=0)
        P = _params(bits, act, "sum", window, pf, lo, hi, mean, var.sqrt(), gamma, beta, cent, edge)
        return _encode3(s, P, bits, act == "relu6", rows), P

    return forward_sum


def _make_encode(bits, relu6, rows, bounded, *_cls):
    def encode(w3, P, lo, hi):  # the codes under a given grid (an outlier recode's, tritonact.outliers)
        if not bounded:
            return _encode3(w3, P, bits, relu6, rows)
        outside = (w3 < _pv(lo)) | (w3 > _pv(hi))  # coded as NaN (code 0), and returned as fp32 0/1 (a bool
        # output is stored a few lanes at a time: the graph took 24 ms with it, 4.9 with fp32, (16, 256, 1024))
        return _encode3(torch.where(outside, float("nan"), w3), P, bits, relu6, rows), outside.float()

    return encode


def _decoded_act(d, P, bits, act, v3, table=False):
    """A unit's output decoded from its code (fp32, shape ``v3``): ``reference.decode_act_ref``'s formula."""
    v, _ = _decode3(d, P, bits, act, v3, table)
    if act != "none":
        v = v.clamp(min=0.0)
    return v * _pv(P[_R["A"]]) + _pv(P[_R["B"]])


def _make_decode_act(bits, act, dtype, table, *_cls):
    def decode_act(d, P, like3):
        return _decoded_act(d, P, bits, act, like3.shape, table).to(dtype)

    return decode_act


def _make_backward(bits, act, mode, ract, inplace, tables, extra, *_cls):
    """``mode``: "plain" (xh from the code), "residual" (xh = (s - r - beta) / gamma, ``r`` a tensor), "rcode" (the
    same with ``r`` decoded in-loop from its own code, activation ``ract``), "xh" (xh from a second code).
    ``extra``: the graph takes ``(2, C)`` sums added to ``(sum_gzxh, sum_gz)`` before the input gradient uses them
    (``tritonact.escaped``; the sums it returns are without them).
    ``inplace``: ``g_y`` (a join's ``g_z``) is written into ``g3`` (inductor stores into the input's buffer: no
    activation-sized temporary) and returned as None."""

    def unit_backward(g3, d, P, gamma, beta, invstd, r3, xd, xP, ex):
        v, mask = _decode3(d, P, bits, act, g3.shape, tables[0])
        g_z = g3.float()
        if act != "none":
            g_z = g_z * mask
        if mode == "xh":
            xv, _ = _decode3(xd, xP, bits, "none", g3.shape, tables[1])
            xh = xv * _pv(xP[_R["sgn"]]) + _pv(xP[_R["o"]])
        else:
            xh = v * _pv(P[_R["sgn"]]) + _pv(P[_R["o"]])
            if mode in ("residual", "rcode"):
                r = r3.float() if mode == "residual" else _decoded_act(xd, xP, bits, ract, g3.shape, tables[1])
                g_safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
                xh = (xh - r - _pv(beta)) / _pv(g_safe)
        # summed over each row first, then over the rows: the loop then runs in the decode's order (outer, C, inner)
        # and inductor fuses the two (one pass fewer: a (16, 64, 1024) backward 1.91 -> 1.33 ms, one thread)
        sum_gz = g_z.sum(dim=2).sum(dim=0)
        sum_gzxh = (g_z * xh).sum(dim=2).sum(dim=0)
        M = g3.numel() // gamma.numel()
        all_gz, all_gzxh = (sum_gz + ex[1], sum_gzxh + ex[0]) if extra else (sum_gz, sum_gzxh)
        g_y = (g_z - _pv(all_gz / M) - xh * _pv(all_gzxh / M)) * _pv(gamma * invstd)
        if not inplace:
            return g_y, sum_gzxh, sum_gz, (g_z if mode != "plain" else None)
        if mode == "plain":
            g3.copy_(g_y)
            return None, sum_gzxh, sum_gz, None
        g3.copy_(g_z)
        return g_y, sum_gzxh, sum_gz, None

    return unit_backward


def _make_robust_stats(coded, rounds, clip, *_cls):
    def robust_stats(w3):  # outliers.robust_stats_ref's formulas, each sum over a row first, then over the rows
        total = lambda t: t.sum(dim=2).sum(dim=0)  # noqa: E731
        wmin, wmax = w3.amin(dim=2).amin(dim=0), w3.amax(dim=2).amax(dim=0)
        if coded == "xh":
            mean, std = torch.zeros_like(wmin), torch.ones_like(wmin)
        else:
            M = w3.shape[0] * w3.shape[2]
            mean = total(w3) / M
            std = (total((w3 - _pv(mean)).square()) / M).sqrt()
        for _ in range(rounds):
            keep = ((w3 - _pv(mean)).abs() <= _pv(clip * std)).float()
            n = total(keep).clamp(min=1.0)
            m = total(w3 * keep) / n
            var = total((w3 - _pv(m)).square() * keep) / n
            mean, std = m, var.sqrt().clamp(min=1e-12)
        return wmin, wmax, mean, std

    return robust_stats


def _make_pool_index(direction, kernel, stride, padding, dilation, dtype, *_cls):
    f = ref.local_index if direction == "local" else ref.global_index

    def pool_index(t, w_like):
        return f(t, (0, 0, 0, w_like.shape[0]), kernel, stride, padding, dilation, dtype)

    return pool_index


_MAKERS = {
    "forward_xh": _make_forward_xh,
    "forward_sum": _make_forward_sum,
    "decode_act": _make_decode_act,
    "centroid_stats": _make_centroid_stats,
    "encode": _make_encode,
    "robust_stats": _make_robust_stats,
    "backward": _make_backward,
    "pool_index": _make_pool_index,
}
