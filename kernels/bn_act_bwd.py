"""Backward of a fused BN (+ residual add) + activation unit from its codes (contract:
``tritonact.reference.unit_backward_ref``). Layout and conventions as in ``bn_act.py``:

* ``_bn_act_reduce_bwd_kernel``: per-channel partials of ``sum(g_z)`` and ``sum(g_z * xh~)``, codes decoded in-kernel
  (``T + b/8``; ``+T`` when xh~ is recovered from an exact residual), summed by torch.
* ``_bn_act_bwd_kernel``: ``g_y`` (and ``g_res = g_z`` for a join) over 3-D tiles (``2T + b/8``; ``+T`` for ``g_res``).

Reductions are two-stage (per-program partials, then a reduce): deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tritonact.kernels.bn_act import _decode, _empty, _store, _tile, _tiles, _view3

from tritonact import centroids
from tritonact import reference as ref


@triton.jit
def _bwd_tile(
    t,
    cb,
    g_ptr,
    sgo,
    sgc,
    sgi,
    data_ptr,
    p_ptr,
    r_ptr,
    sro,
    src,
    sri,
    xdata_ptr,
    xp_ptr,
    gamma_ptr,
    beta_ptr,
    outer,
    C,
    inner,
    ACT: tl.constexpr,
    XH: tl.constexpr,
    TAB: tl.constexpr,
    BITS: tl.constexpr,
    BO: tl.constexpr,
    BC: tl.constexpr,
    BI: tl.constexpr,
):
    """``(g_z, xh~)`` of one tile, plus its indices and mask. XH: 0 = xh~ is w~, 1 = recovered from the sum's code
    and the residual, 2 = decoded from the second code. TAB: bit 0 (1) the grid of ``data`` has a centroid table,
    bit 1 (2) that of ``xdata``."""
    o3, c3, k3, m = _tile(t, cb, outer, C, inner, BO, BC, BI)
    i = (o3 * C + c3) * inner + k3  # memory-order element index (codes, dense outputs)
    PER: tl.constexpr = 8 // BITS
    CODE: tl.constexpr = (1 << BITS) - 1
    shift = (i % PER).to(tl.int32) * BITS
    q = (tl.load(data_ptr + i // PER, mask=m, other=0).to(tl.int32) >> shift) & CODE
    xh, keep = _decode(q, p_ptr, c3, C, True, TAB % 2 == 1)
    gz = tl.load(g_ptr + o3 * sgo + c3 * sgc + k3 * sgi, mask=m, other=0.0).to(tl.float32)
    if ACT != "none":
        gz = gz * keep.to(tl.float32)  # like the reference's g * mask (an inf/NaN gradient stays visible)
    if XH == 2:
        q = (tl.load(xdata_ptr + i // PER, mask=m, other=0).to(tl.int32) >> shift) & CODE
        xh, keep2 = _decode(q, xp_ptr, c3, C, True, TAB // 2 == 1)
    elif XH == 1:  # (w~ - r - beta) / gamma, gamma == 0 read as 1 (op order of the reference)
        gamma = tl.load(gamma_ptr + c3, mask=c3 < C, other=1.0)
        r = tl.load(r_ptr + o3 * sro + c3 * src + k3 * sri, mask=m, other=0.0).to(tl.float32)
        xh = (xh - r - tl.load(beta_ptr + c3, mask=c3 < C, other=0.0)) / tl.where(gamma == 0, 1.0, gamma)
    return gz, tl.where(m, xh, 0.0), i, c3, m


@triton.jit
def _bn_act_reduce_bwd_kernel(
    part_ptr,
    g_ptr,
    sgo,
    sgc,
    sgi,
    data_ptr,
    p_ptr,
    r_ptr,
    sro,
    src,
    sri,
    xdata_ptr,
    xp_ptr,
    gamma_ptr,
    beta_ptr,
    outer,
    C,
    inner,
    n_tiles,
    ACT: tl.constexpr,
    XH: tl.constexpr,
    TAB: tl.constexpr,
    BITS: tl.constexpr,
    BO: tl.constexpr,
    BC: tl.constexpr,
    BI: tl.constexpr,
):
    pid, cb, n_split = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    s_gz = tl.zeros([BO, BC, BI], tl.float32)
    s_gzxh = tl.zeros([BO, BC, BI], tl.float32)
    for t in range(pid, n_tiles, n_split):
        gz, xh, i, c3, m = _bwd_tile(
            t,
            cb,
            g_ptr,
            sgo,
            sgc,
            sgi,
            data_ptr,
            p_ptr,
            r_ptr,
            sro,
            src,
            sri,
            xdata_ptr,
            xp_ptr,
            gamma_ptr,
            beta_ptr,
            outer,
            C,
            inner,
            ACT,
            XH,
            TAB,
            BITS,
            BO,
            BC,
            BI,
        )
        s_gz += gz
        s_gzxh += gz * xh
    c = cb.to(tl.int64) * BC + tl.arange(0, BC)
    dst = part_ptr + pid.to(tl.int64) * C + c
    tl.store(dst, tl.sum(tl.sum(s_gz, axis=2), axis=0), mask=c < C)
    tl.store(dst + n_split.to(tl.int64) * C, tl.sum(tl.sum(s_gzxh, axis=2), axis=0), mask=c < C)


@triton.jit
def _bn_act_bwd_kernel(
    gy_ptr,
    gres_ptr,
    g_ptr,
    sgo,
    sgc,
    sgi,
    data_ptr,
    p_ptr,
    r_ptr,
    sro,
    src,
    sri,
    xdata_ptr,
    xp_ptr,
    gamma_ptr,
    beta_ptr,
    coef_ptr,
    outer,
    C,
    inner,
    ACT: tl.constexpr,
    XH: tl.constexpr,
    TAB: tl.constexpr,
    JOIN: tl.constexpr,
    BITS: tl.constexpr,
    BO: tl.constexpr,
    BC: tl.constexpr,
    BI: tl.constexpr,
):
    gz, xh, i, c3, m = _bwd_tile(
        tl.program_id(0),
        tl.program_id(1),
        g_ptr,
        sgo,
        sgc,
        sgi,
        data_ptr,
        p_ptr,
        r_ptr,
        sro,
        src,
        sri,
        xdata_ptr,
        xp_ptr,
        gamma_ptr,
        beta_ptr,
        outer,
        C,
        inner,
        ACT,
        XH,
        TAB,
        BITS,
        BO,
        BC,
        BI,
    )
    # coef rows: gamma * invstd, mean(g_z), mean(g_z * xh~)  (op order of reference.bn_backward_ref)
    scale = tl.load(coef_ptr + c3, mask=c3 < C, other=0.0)
    mgz = tl.load(coef_ptr + C + c3, mask=c3 < C, other=0.0)
    mgx = tl.load(coef_ptr + 2 * C + c3, mask=c3 < C, other=0.0)
    _store(gy_ptr, i, scale * (gz - mgz - xh * mgx), m)
    if JOIN:
        _store(gres_ptr, i, gz, m)


def unit_backward(
    g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual=None, xh_code=None, inplace=False, reduce=None
):
    """Contract of ``reference.unit_backward_ref``, except that ``g_y`` and ``g_residual`` come in ``g``'s dtype
    (the dtype autograd wants them in; ``g_residual = g_z`` is exact in it). ``g_gamma``, ``g_beta``: fp32.
    ``inplace``: ``g`` (dense in ``perm``) is overwritten with ``g_y`` (a join's ``g_residual``); each element is
    read before it is written, by the same program. ``reduce``: applied to ``(sum_gz, sum_gzxh, count)`` between
    the two kernels (the reference's contract)."""
    perm = tuple(perm)
    C = shape[1]
    g3 = _view3(g, perm)
    outer, _, inner = g3.shape
    xh_mode = 2 if xh_code is not None else (1 if residual is not None else 0)
    r3 = _view3(residual, perm) if xh_mode == 1 else g3
    xd, xP = xh_code if xh_mode == 2 else (data, P)
    gamma, beta = gamma.detach().float(), beta.detach().float()
    args = (data, P, r3, *r3.stride(), xd, xP, gamma, beta)
    tab = int(centroids.has_table(P, ref.PARAM_ROWS)) + 2 * int(
        xh_mode == 2 and centroids.has_table(xP, ref.PARAM_ROWS)
    )
    grid, n_tiles, meta = _tiles("bn_bwd_reduce", g3, split=True, bits=bits)
    part = torch.empty(2, grid[0], C, dtype=torch.float32, device=g.device)
    _bn_act_reduce_bwd_kernel[grid](
        part, g3, *g3.stride(), *args, outer, C, inner, n_tiles, ACT=act, XH=xh_mode, TAB=tab, BITS=bits, **meta
    )
    sum_gz, sum_gzxh = part.sum(1)
    M = outer * inner
    all_gz, all_gzxh = sum_gz, sum_gzxh
    if reduce is not None:
        all_gz, all_gzxh, M = reduce(sum_gz, sum_gzxh, M)
    coef = torch.stack([gamma * invstd.float(), all_gz / M, all_gzxh / M])
    joined = residual is not None or xh_code is not None
    g_res = (g if inplace else _empty(shape, perm, g.dtype, g.device)) if joined else None
    g_y = g if inplace and not joined else _empty(shape, perm, g.dtype, g.device)
    grid, _, meta = _tiles("bn_bwd", g3, split=False, bits=bits)
    _bn_act_bwd_kernel[grid](
        g_y,
        g_res if joined else g_y,
        g3,
        *g3.stride(),
        *args,
        coef,
        outer,
        C,
        inner,
        ACT=act,
        XH=xh_mode,
        TAB=tab,
        JOIN=joined,
        BITS=bits,
        **meta,
    )
    return g_y, sum_gzxh, sum_gz, g_res
