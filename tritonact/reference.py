"""Plain-PyTorch references of the fused BN(+add)+activation kernels: the CPU path and the kernels' contract.

The coded value ``w`` of a unit is the BN's normalized input ``xh`` (a BN with no residual add) or the pre-activation
sum ``s = BN(y) + residual`` (a residual join). Each channel has a threshold-anchored grid, described by a
``(PARAM_ROWS, C)`` fp32 tensor (rows below)::

    v  = (w - o) * sgn                       # v > 0  <=>  the activation passes (ReLU mask)
    v > 0:   q = nneg + min(floor(v * rdp), qtop - nneg)         (positive grid, step dp)
    v <= 0:  q = nneg - 1 - min(floor(-v * rdn), nneg - 1)      (negative grid, step dn)
    v >= vhi: q = 2**bits - 1                                    (ReLU6 saturation; vhi = inf otherwise)
    q = clamp(q, 0, 2**bits - 1); NaN -> 0

Decoding: ``v~ = (q - nneg + off[q]) * (dp if q >= nneg else dn)``, ``v~ = vhi`` where ``q > qtop``, with
``off[q] = 0.5`` (the bin's midpoint) or, where ``P`` has a centroid table, its row for ``q`` (``tritonact.centroids``);
``w~ = o + sgn * v~``; mask ``= nneg <= q <= qtop`` (exact); the activation the next layer consumed is
``a~ = A * f(v~) + B`` with ``f = max(., 0)`` for ReLU/ReLU6 units and the identity otherwise.
Codes are packed like ``tritonact.quant`` (memory order, ``8 // bits`` per byte, LSB first). Row ``out``: outliers.
"""

from __future__ import annotations

import math

import torch

from tritonact import centroids, escapes
from tritonact.pool_index import global_index, index_dtype, local_index, window_origins  # noqa: F401
from tritonact.quant import _channel_view_shape, _inverse, edge_aligned_grid, memory_order, pack_codes, unpack_codes

ROWS = ("o", "sgn", "rdp", "rdn", "dp", "dn", "nneg", "qtop", "vhi", "A", "B", "out")  # out: outliers.flagged
R = {name: i for i, name in enumerate(ROWS)}
PARAM_ROWS = len(ROWS)

ACTS = ("relu", "relu6", "none")
_TINY = 1e-20
OUTLIER_SIGMAS = 8.0  # row "out": a value this many std from the mean (tritonact.outliers)


def channel_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def bview(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector ``(C,)`` viewed to broadcast against ``x`` (logical NC... order)."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


def apply_act(z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return torch.relu(z)
    if act == "relu6":
        return z.clamp(0.0, 6.0)
    return z


def _traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is a fake tensor of a trace (``tritonact.compiled``), whose values cannot be asked for."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def code_params(
    *,
    bits: int,
    act: str,
    wmin: torch.Tensor,
    wmax: torch.Tensor,
    wmean: torch.Tensor,
    wstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    coded: str,
    window: float,
    positive_fraction: float | None,
    centroids: bool = False,
    edge: float = -1.0,
) -> torch.Tensor:
    """Per-channel grid of a unit. All inputs are fp32 ``(C,)`` except the python scalars.

    Args:
        coded: ``"xh"`` (w is the BN's normalized input; mean 0, std 1) or ``"sum"`` (w is BN(y) + residual).
        window: half-width of the coded window in standard deviations of ``w``; ``inf`` = observed min/max.
        positive_fraction: share of the levels above the threshold where a channel has values on both sides;
            None splits them by the extent of each side (the generic path, ``tritonact.saved``).
        centroids: append the ``2**bits`` rows of a centroid table (``tritonact.centroids``), all 0.5 until the
            encoder measures them.
        edge: ``act == "none"`` only: where ``>= 0``, the values ``±edge`` of the unit's output fall on bin edges
            wherever they lie inside the coded range (``quant.edge_aligned_grid``); an activation whose derivative
            jumps there (Hardswish, Hardsigmoid: 3; LeakyReLU, PReLU, SELU: 0) then gets its region exact.
    """
    L = float(1 << bits)
    C = wmin.numel()
    P = torch.full((PARAM_ROWS + (int(L) if centroids else 0), C), 0.5, dtype=torch.float32, device=wmin.device)
    one = torch.ones_like(wmin)
    # window in w units, intersected with the observed range
    if math.isinf(window):
        lo_w, hi_w = wmin, wmax
    else:
        lo_w = torch.maximum(wmin, wmean - window * wstd)
        hi_w = torch.minimum(wmax, wmean + window * wstd)

    if act == "none":
        o, sgn = lo_w, one
        vmax = hi_w - lo_w
        nneg = torch.zeros_like(wmin)
        qtop = torch.full_like(wmin, L - 1)
        vhi = torch.full_like(wmin, math.inf)
        dp = torch.clamp(vmax / L, min=_TINY)
        if edge >= 0:
            if coded == "xh":  # the output gamma * xh + beta at -edge and +edge, in xh units
                g_safe = torch.where(gamma == 0, one, gamma)
                ea, eb = (-edge - beta) / g_safe, (edge - beta) / g_safe
                nan = torch.full_like(ea, math.nan)  # gamma == 0: a constant output, no edge inside
                ea, eb = torch.where(gamma == 0, nan, ea), torch.where(gamma == 0, nan, eb)
            else:
                ea, eb = torch.full_like(wmin, -edge), torch.full_like(wmin, edge)
            o, dp = edge_aligned_grid(lo_w, hi_w, torch.minimum(ea, eb), torch.maximum(ea, eb), L)
        dn = one
        if coded == "xh":
            A, B = gamma, gamma * o + beta
        else:
            A, B = one, o
        P[R["o"]], P[R["sgn"]] = o, sgn
    else:
        if coded == "xh":
            deg = gamma == 0
            g_safe = torch.where(deg, one, gamma)
            sgn = torch.where(gamma < 0, -one, one)
            o = -beta / g_safe
            absg = gamma.abs()
        else:
            deg = torch.zeros_like(wmin, dtype=torch.bool)
            sgn, o, absg = one, torch.zeros_like(wmin), one
        # v-space extent of the data and of the window
        vmin = torch.where(sgn > 0, wmin - o, o - wmax)
        vmax = torch.where(sgn > 0, wmax - o, o - wmin)
        wlo = torch.where(sgn > 0, lo_w - o, o - hi_w)
        whi = torch.where(sgn > 0, hi_w - o, o - lo_w)
        # A side that holds data is never dropped by the window (the ReLU threshold may lie outside it).
        pos_hi = torch.where(whi > 0, whi, vmax)
        neg_lo = torch.where(wlo < 0, wlo, vmin)
        if act == "relu6":
            vhi = 6.0 / torch.where(deg, one, absg)
            sat_possible = vmax >= vhi
            pos_hi = torch.minimum(pos_hi, vhi)
        else:
            vhi = torch.full_like(wmin, math.inf)
            sat_possible = torch.zeros_like(deg)
        if positive_fraction is None:  # levels split by the extent of each side (the generic path)
            ext_n, ext_p = (-neg_lo).clamp(min=0.0), pos_hi.clamp(min=0.0)
            n_neg_mixed = torch.round(L * ext_n / torch.clamp(ext_n + ext_p, min=_TINY)).clamp_(1.0, L - 1.0)
        else:
            n_neg_mixed = max(1.0, float(round(L * (1.0 - positive_fraction))))
        nneg = torch.where(vmax <= 0, L, torch.where(vmin > 0, 0.0, n_neg_mixed))
        qtop = torch.where(sat_possible, L - 2, L - 1)
        qtop = torch.maximum(qtop, nneg)  # at least one positive bin whenever there are positive codes
        npos = torch.clamp(qtop - nneg + 1, min=1.0)
        dp = torch.clamp(pos_hi / npos, min=_TINY)
        dn = torch.clamp(-neg_lo / torch.clamp(nneg, min=1.0), min=_TINY)
        if positive_fraction is None:  # no value below 0: the negative level holds only zeros, which decode to 0
            dn = torch.where(neg_lo < 0, dn, 0.0)
        A, B = absg, torch.zeros_like(wmin)
        # (on a GPU always applied, as no-ops where gamma != 0: asking deg.any() would stall on a host sync)
        if coded == "xh" and (deg.is_cuda or torch.compiler.is_compiling() or _traced(deg) or bool(deg.any())):
            # gamma == 0: the output is act(beta), constant per channel; code xh on one uniform grid and make the
            # mask constant through nneg (all codes active, or none).
            act_beta = apply_act(beta, act)
            active = (beta > 0) & ((beta < 6.0) if act == "relu6" else torch.ones_like(deg))
            rng = torch.clamp(hi_w - lo_w, min=_TINY)
            o = torch.where(deg, torch.where(active, lo_w, hi_w), o)
            sgn = torch.where(deg, one, sgn)
            nneg = torch.where(deg, torch.where(active, 0.0, L), nneg)
            qtop = torch.where(deg, L - 1, qtop)
            vhi = torch.where(deg, math.inf, vhi)
            dp = torch.where(deg, rng / L, dp)
            dn = torch.where(deg, rng / L, dn)
            A = torch.where(deg, 0.0, A)
            B = torch.where(deg, act_beta, B)
        P[R["o"]], P[R["sgn"]] = o, sgn
    P[R["dp"]], P[R["dn"]] = dp, dn
    P[R["rdp"]], P[R["rdn"]] = 1.0 / dp, torch.where(dn > 0, 1.0 / dn, 0.0)  # dn is 0 only in that case
    P[R["nneg"]], P[R["qtop"]], P[R["vhi"]] = nneg, qtop, vhi
    P[R["A"]], P[R["B"]] = A, B
    far = (wmax - wmean > OUTLIER_SIGMAS * wstd) | (wmean - wmin > OUTLIER_SIGMAS * wstd)
    P[R["out"]] = far.float() if not math.isinf(window) else torch.zeros_like(wmin)  # (a tensor: a traced scalar
    # fill would be a constant that a stored graph does not bring back, tritonact.graphs)
    return P


def _rows(P: torch.Tensor, shape_b) -> dict[str, torch.Tensor]:
    return {name: P[i].view(shape_b) for i, name in enumerate(ROWS)}


def encode_ref(w: torch.Tensor, P: torch.Tensor, bits: int, act: str | None = None, acc=None, acc_n=None):
    """Packed codes of ``w`` (fp32, any dense layout; channel dim 1) under the grid ``P``.

    The formula of the module docstring, computed without boolean masks (``torch.where`` and bool products are
    an order of magnitude slower than arithmetic on CPU) but with the same values::

        A = max(min(floor(max(v, 0) * rdp), qtop - nneg), 0)  # = the positive grid's offset where v > 0, else 0
        B = min(floor(-min(v, 0) * rdn), nneg - 1)            # = the negative grid's offset where v <= 0
        q = nneg + A - [v <= 0] * (1 + B)                     # [v <= 0] = 1 - max(sign(v), 0)

    (small integers: every step is exact). ``act`` other than ``"relu6"`` (or None) skips the saturation test,
    which cannot fire for such grids. ``acc``: centroid statistics (``tritonact.centroids``) the first ``acc_n``
    samples of ``w`` (all by default) are added to.
    """
    perm = memory_order(w)
    wp = w.permute(perm)
    p = _rows(P, _channel_view_shape(wp.shape, perm))
    L1 = float((1 << bits) - 1)
    v = wp - p["o"]
    v.mul_(p["sgn"])
    q = v.clamp(min=0.0).mul_(p["rdp"]).floor_()
    torch.minimum(q, p["qtop"] - p["nneg"], out=q).clamp_(min=0.0)  # A (qtop < nneg only where no v > 0 exists)
    b = v.clamp(max=0.0).mul_(p["rdn"]).neg_().floor_()
    torch.minimum(b, p["nneg"] - 1.0, out=b)  # B
    b.add_(1.0).mul_(torch.sign(v).clamp_(min=0.0).neg_().add_(1.0))  # [v <= 0] * (1 + B)
    q.add_(p["nneg"]).sub_(b)
    del b
    if act in (None, "relu6"):
        q = torch.where(v >= p["vhi"], L1, q)
    q.clamp_(0.0, L1).nan_to_num_(nan=0.0)  # only a NaN w gives a NaN q here
    if acc is not None and acc_n != 0:
        k = w.shape[0] if acc_n is None else acc_n
        sub = (slice(None),) * perm.index(0) + (slice(0, k),)  # the first k samples, in memory order's view
        f, keep = centroids.contributions(v[sub], q[sub], p)
        chan = torch.arange(P.shape[1], device=w.device).view(_channel_view_shape(wp.shape, perm))
        centroids.accumulate_(acc, f, keep, q[sub], chan, P.shape[1])
    return pack_codes(q.to(torch.uint8), bits)


def _decode_v(data, P, bits, shape, perm, act=None, into=None, float_mask=False, esc=None):
    """``v~`` (and the mask) of the codes: ``t = (q - nneg) + off[q]`` (``off = 0.5``, the midpoint, without a
    centroid table), ``v~ = t * dp`` where ``q >= nneg`` else ``t * dn``, computed as ``(t * s) * dp + (t * (1 - s))
    * dn`` with ``s = [q >= nneg]`` (one product is 0 or -0: the same value); no boolean masks on the hot path.
    ``esc``: the code's escaped values (``tritonact.escapes``), exact in ``v~`` and the mask."""
    perm_shape = [shape[d] for d in perm]
    q = unpack_codes(data, bits, math.prod(shape)).view(perm_shape)
    shape_b = _channel_view_shape(perm_shape, perm)
    p = _rows(P, shape_b)
    t = q.float() if into is None else into.copy_(q)
    relu6 = act in (None, "relu6")
    sat = (t > p["qtop"]) if relu6 else None
    if centroids.has_table(P, PARAM_ROWS):
        off = centroids.lookup(P, q, torch.arange(P.shape[1], device=q.device).view(shape_b), PARAM_ROWS)
    else:
        off = 0.5
    t.sub_(p["nneg"])
    side = torch.sign(t.add(0.5)).clamp_(min=0.0)  # 1 where q >= nneg
    mask = side if float_mask else side > 0
    t.add_(off)
    pos = (t * side).mul_(p["dp"])
    v = t.mul_(side.neg().add_(1.0)).mul_(p["dn"]).add_(pos)
    del pos
    if relu6:
        torch.where(sat, p["vhi"], v, out=v)
        mask = mask * (~sat) if float_mask else mask & ~sat
    escapes.apply_(v, mask, P[R["o"]], P[R["sgn"]], P[R["vhi"]], esc, perm)
    return v, mask, p


def decode_value_ref(data, P, bits, shape, perm, act=None, float_mask=False, esc=None):
    """``(w~, mask)`` in fp32 / bool (fp32 0/1 with ``float_mask``), logical shape (memory format of the original)."""
    v, mask, p = _decode_v(data, P, bits, shape, perm, act, float_mask=float_mask, esc=esc)
    w = v.mul_(p["sgn"]).add_(p["o"])
    inv = _inverse(perm)
    return w.permute(inv), mask.permute(inv)


def decode_act_ref(data, P, bits, shape, perm, act: str, dtype: torch.dtype, out=None, esc=None) -> torch.Tensor:
    """The approximate activation ``a~ = A * f(v~) + B`` that the unit's consumers computed from, in ``dtype``.

    ``out``: optional dense buffer of that shape, memory order and dtype to decode into (a ring slot)."""
    into = out.permute(perm) if (out is not None and out.dtype == torch.float32) else None
    v, _, p = _decode_v(data, P, bits, shape, perm, act, into, esc=esc)
    if act != "none":
        v.clamp_(min=0.0)
    a = v.mul_(p["A"]).add_(p["B"]).permute(_inverse(perm))
    if out is None:
        return a.to(dtype)
    if into is None:
        out.copy_(a)
    return out


# Elements per chunk of the CPU path's per-unit work (temporaries are a few times this, whatever the batch).
CHUNK_ELEMENTS = 1 << 20


def batch_ranges(N: int, per_sample: int, target: int | None = None):
    """Sample ranges of about ``target`` int64 indices each (index maps are made a few samples at a time)."""
    target = CHUNK_ELEMENTS // 4 if target is None else target  # int64 indices: 8 bytes per element
    k = max(1, target // max(per_sample, 1))
    return [(n0, min(N, n0 + k)) for n0 in range(0, N, k)]


def sample_chunks(shape, perm, bits: int, target: int | None = None):
    """Split the batch (dim 0) into ranges of about ``target`` elements whose codes start on a byte boundary.

    Yields ``(n0, n1, b0, b1)``: samples and the byte range of their codes. A single range when the batch is
    not the outermost dim in memory."""
    target = CHUNK_ELEMENTS if target is None else target
    N = shape[0]
    per = math.prod(shape[1:])
    if not perm or perm[0] != 0 or N <= 1:
        yield 0, N, 0, (N * per * bits + 7) // 8
        return
    k = max(1, target // max(per, 1))
    if (per * bits) % 8:
        k = max(4, k - k % 4)  # 4 samples always end on a byte for bits >= 2
    for n0 in range(0, N, k):
        n1 = min(N, n0 + k)
        yield n0, n1, n0 * per * bits // 8, (n1 * per * bits + 7) // 8


# ----------------------------------------------------------------------------------------------------------
# whole-unit references (forward statistics and backward), CPU path


def value_stats(w: torch.Tensor, coded: str) -> tuple[torch.Tensor, ...]:
    """Per-channel ``(min, max, mean, std)`` of the coded value (``xh`` has mean 0 and std 1 by construction)."""
    dims = channel_dims(w)
    wmin = w.amin(dim=dims)
    wmax = w.amax(dim=dims)
    if coded == "xh":
        return wmin, wmax, torch.zeros_like(wmin), torch.ones_like(wmin)
    var, mean = torch.var_mean(w, dim=dims, unbiased=False)
    return wmin, wmax, mean, var.sqrt()


def bn_backward_ref(g_z: torch.Tensor, xh: torch.Tensor, gamma: torch.Tensor, invstd: torch.Tensor):
    """BN input gradient and (grad gamma, grad beta) from the pre-BN-output gradient ``g_z`` (fp32) and ``xh``."""
    dims = channel_dims(g_z)
    M = g_z.numel() // g_z.shape[1]
    sum_gz = g_z.sum(dim=dims)
    sum_gzxh = (g_z * xh).sum(dim=dims)
    g_y = bview(gamma * invstd, g_z) * (g_z - bview(sum_gz / M, g_z) - xh * bview(sum_gzxh / M, g_z))
    return g_y, sum_gzxh, sum_gz


def unit_backward_ref(
    g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual=None, xh_code=None, inplace=False, reduce=None,
    esc=None,
):  # fmt: skip
    """Backward of one unit from its code (the CPU path; contract of ``kernels.bn_act_bwd.unit_backward``).

    Args:
        g: ``dL/d out`` (any float dtype, the unit output's layout).
        data, P, bits, shape, perm: the unit's code (``w`` = ``xh``, or the sum ``s`` for a residual join).
        act: ``"relu"`` | ``"relu6"`` | ``"none"``.
        gamma, beta, invstd: fp32 ``(C,)``.
        residual: for a join whose BN value is recovered from the sum: the residual as the join saw it
            (decoded from its own code, or exact), any float dtype, or a callable ``(n0, n1) -> tensor`` giving
            it for a range of samples; else None.
        xh_code: for a join that stores the BN value as a second code: ``(data, P)`` or ``(data, P, esc)`` of it
            (act "none").
        inplace: ``g`` (fp32, dense in ``perm``) may be overwritten: it becomes ``g_y`` (``g_residual = g_z``
            for a join), so the backward allocates one activation-sized tensor less.
        reduce: maps ``(sum_gz, sum_gzxh, count)`` before the input gradient uses them (SyncBatchNorm's all-reduce).
        esc: the code's escaped values (``tritonact.escapes``), or None.

    Returns:
        ``(g_y, g_gamma, g_beta, g_residual)`` in fp32; ``g_residual`` is None without a residual.

    Works through the batch in chunks (:func:`sample_chunks`), decoding each twice (once for the per-channel
    sums, once for the input gradient), so its temporaries stay a fraction of the activation's size.
    """
    joined = residual is not None or xh_code is not None
    if inplace:
        g_z_all = g
    else:
        g_z_all = torch.empty(g.shape, dtype=torch.float32, device=g.device).as_strided(g.shape, _dense_strides(g))
    g_y = torch.empty_like(g_z_all) if joined else g_z_all  # non-joins compute g_y in place of g_z
    C = shape[1]
    sum_gz = torch.zeros(C, dtype=torch.float32, device=g.device)
    sum_gzxh = torch.zeros_like(sum_gz)
    g_safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)

    def xh_of(n0, n1, b0, b1, w):
        sub = (n1 - n0,) + tuple(shape[1:])
        if xh_code is not None:
            xesc = escapes.select(xh_code[2] if len(xh_code) > 2 else None, n0, n1, shape, perm)
            return decode_value_ref(xh_code[0][b0:b1], xh_code[1], bits, sub, perm, "none", esc=xesc)[0]
        if residual is not None:  # xh = (s - r - beta) / gamma
            r = residual(n0, n1) if callable(residual) else residual[n0:n1]
            return w.sub_(r).sub_(bview(beta, w)).div_(bview(g_safe, w))
        return w

    chunks = list(sample_chunks(shape, perm, bits))
    dims = channel_dims(g)
    kept_xh = None  # with a single chunk, the decoded value is kept for the second pass instead of decoded again
    for n0, n1, b0, b1 in chunks:
        sub = (n1 - n0,) + tuple(shape[1:])
        w, mask = decode_value_ref(data[b0:b1], P, bits, sub, perm, act, True, escapes.select(esc, n0, n1, shape, perm))
        g_z = g_z_all[n0:n1]
        if not inplace:
            g_z.copy_(g[n0:n1])
        if act != "none":
            g_z.mul_(mask)
        sum_gz += g_z.sum(dim=dims)
        xh = xh_of(n0, n1, b0, b1, w)
        sum_gzxh += (g_z * xh).sum(dim=dims)
        if len(chunks) == 1:
            kept_xh = xh
    M = g.numel() // C
    all_gz, all_gzxh, M = reduce(sum_gz, sum_gzxh, M) if reduce is not None else (sum_gz, sum_gzxh, M)
    k = bview(gamma * invstd, g_z_all)
    mean_gz, mean_gzxh = bview(all_gz / M, g_z_all), bview(all_gzxh / M, g_z_all)
    for n0, n1, b0, b1 in chunks:
        sub = (n1 - n0,) + tuple(shape[1:])
        if kept_xh is not None:
            xh = kept_xh
        else:
            e = escapes.select(esc, n0, n1, shape, perm)
            xh = xh_of(n0, n1, b0, b1, decode_value_ref(data[b0:b1], P, bits, sub, perm, act, esc=e)[0])
        # g_y = gamma * invstd * (g_z - mean(g_z) - xh * mean(g_z * xh))
        torch.sub(g_z_all[n0:n1], mean_gz, out=g_y[n0:n1])
        g_y[n0:n1].sub_(xh.mul_(mean_gzxh)).mul_(k)
    return g_y, sum_gzxh, sum_gz, (g_z_all if joined else None)


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a dense tensor with ``t``'s shape and memory order."""
    perm = memory_order(t)
    inner = [math.prod(t.shape[d] for d in perm[i + 1 :]) for i in range(t.dim())]
    return tuple(inner[perm.index(d)] for d in range(t.dim()))


def activate_(out: torch.Tensor, act: str) -> torch.Tensor:
    """The unit's activation applied in place."""
    if act == "relu":
        out.relu_()
    elif act == "relu6":
        out.clamp_(0.0, 6.0)
    return out


def empty_in(shape, perm, dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh tensor of logical ``shape``, dense in memory order ``perm`` (so NCHW / channels_last is kept)."""
    return torch.empty([shape[d] for d in perm], dtype=dtype, device=device).permute(_inverse(tuple(perm)))


def dense_in(t: torch.Tensor, perm, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, dense in memory order ``perm`` (a copy only where it is not already)."""
    if t.dtype == dtype and t.permute(tuple(perm)).is_contiguous():
        return t
    return empty_in(t.shape, perm, dtype, t.device).copy_(t)
