"""Fused BN (+ residual add) + activation: forward with k-bit codes and code decoding (the backward from the codes
is in ``bn_act_bwd.py``).

Contracts: ``tritonact.backends.TorchBackend.bn_act`` and ``tritonact.reference`` (``encode_ref``, ``decode_*_ref``,
``unit_backward_ref``). Every tensor is addressed in the memory order of the unit's input as ``(outer, C, inner)``
with its own strides (NCHW: ``(N, C, H*W)``, channels_last: ``(N*H*W, C, 1)``), so both formats and expanded
gradients run without a copy; outputs are dense in that order and codes are packed in it (``8 // bits`` per byte,
LSB first). Passes over the data (``T`` bytes per element of the activation dtype, ``b`` bits per code):

* ``_bn_stats_fwd_kernel``: per-channel ``(n, mean, M2, min, max)`` partials over 3-D tiles (per-lane Welford,
  lanes merged by Chan's formula), reduced in float64 by torch; reads ``y`` (``T``). A join runs it again on its
  sum ``s = BN(y) + r`` (``2T``).
* ``_bn_act_fwd_kernel``: one 1-D pass in memory order: normalize, affine, add, activation; writes ``out`` and the
  packed codes (``2T + b/8``; ``+T`` for a residual, ``+b/8`` for a second code of xh).
* ``_decode_fwd_kernel``: one 1-D pass from codes to ``a~`` or ``(w~, mask)``.

Reductions are two-stage (per-program partials, then a reduce): deterministic, no atomics, except the centroid
table's integer sums (``_device._centroid_add``: float64 atomic adds of integers, exact in any order). The forward
and decode kernels are compiled without fp contraction, so codes and decoded values equal the torch reference bit
for bit (given the same grid ``P``) on the GPU as under the interpreter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from tritonact.kernels._config import launch_config, size_bucket
from tritonact.kernels._device import _A, _B, _EXACT, _centroid_add, _decode, _encode, _round, _store, _tile  # noqa: F401

from tritonact import centroids
from tritonact import reference as ref
from tritonact.quant import _inverse, memory_order

# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _bn_stats_fwd_kernel(
    part_ptr,
    y_ptr,
    syo,
    syc,
    syi,
    r_ptr,
    sro,
    src,
    sri,
    mean_ptr,
    invstd_ptr,
    gamma_ptr,
    beta_ptr,
    outer,
    C,
    inner,
    n_tiles,
    SUM: tl.constexpr,
    Z_DT: tl.constexpr,
    S_DT: tl.constexpr,
    BO: tl.constexpr,
    BC: tl.constexpr,
    BI: tl.constexpr,
):
    pid, cb, n_split = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    c = cb.to(tl.int64) * BC + tl.arange(0, BC)
    cv = c[None, :, None]
    if SUM:
        mu = tl.load(mean_ptr + cv, mask=cv < C, other=0.0)
        rs = tl.load(invstd_ptr + cv, mask=cv < C, other=0.0)
        ga = tl.load(gamma_ptr + cv, mask=cv < C, other=0.0)
        be = tl.load(beta_ptr + cv, mask=cv < C, other=0.0)
    # per-lane Welford over this program's tiles; lanes are merged once at the end (Chan et al.)
    n = tl.zeros([BO, BC, BI], tl.float32)
    mean = tl.zeros([BO, BC, BI], tl.float32)
    m2 = tl.zeros([BO, BC, BI], tl.float32)
    lo = tl.full([BO, BC, BI], float("inf"), tl.float32)
    hi = tl.full([BO, BC, BI], float("-inf"), tl.float32)
    for t in range(pid, n_tiles, n_split):
        o3, c3, k3, m = _tile(t, cb, outer, C, inner, BO, BC, BI)
        x = tl.load(y_ptr + o3 * syo + c3 * syc + k3 * syi, mask=m, other=0.0).to(tl.float32)
        if SUM:  # the coded value of a join, s = BN(y) + r, exactly as _bn_act_fwd_kernel computes it
            x = (x - mu) * rs * ga + be
            if Z_DT != "fp32":
                x = _round(x, Z_DT)
            x = x + tl.load(r_ptr + o3 * sro + c3 * src + k3 * sri, mask=m, other=0.0).to(tl.float32)
            if S_DT != "fp32":
                x = _round(x, S_DT)
        n += m.to(tl.float32)
        delta = tl.where(m, x - mean, 0.0)
        mean += delta / tl.maximum(n, 1.0)
        m2 += delta * (x - mean)
        lo = tl.minimum(lo, tl.where(m, x, float("inf")))
        hi = tl.maximum(hi, tl.where(m, x, float("-inf")))
    n_c = tl.sum(tl.sum(n, axis=2), axis=0)
    mean_c = tl.sum(tl.sum(n * mean, axis=2), axis=0) / tl.maximum(n_c, 1.0)
    d = mean - mean_c[None, :, None]
    dst = part_ptr + pid.to(tl.int64) * C + c
    step = n_split.to(tl.int64) * C
    cm = c < C
    tl.store(dst, n_c, mask=cm)
    tl.store(dst + step, mean_c, mask=cm)
    tl.store(dst + 2 * step, tl.sum(tl.sum(m2 + n * d * d, axis=2), axis=0), mask=cm)
    tl.store(dst + 3 * step, tl.min(tl.min(lo, axis=2), axis=0), mask=cm)
    tl.store(dst + 4 * step, tl.max(tl.max(hi, axis=2), axis=0), mask=cm)


@triton.jit
def _bn_act_fwd_kernel(
    out_ptr,
    data_ptr,
    xdata_ptr,
    y_ptr,
    syo,
    syc,
    syi,
    r_ptr,
    sro,
    src,
    sri,
    mean_ptr,
    invstd_ptr,
    gamma_ptr,
    beta_ptr,
    p_ptr,
    xp_ptr,
    acc_ptr,
    xacc_ptr,
    numel,
    nbytes,
    n_stats,
    C,
    inner,
    ACT: tl.constexpr,
    ACTIVATE: tl.constexpr,
    RES: tl.constexpr,
    XH: tl.constexpr,
    CENT: tl.constexpr,
    Z_DT: tl.constexpr,
    S_DT: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    BYTES: tl.constexpr = BLOCK // PER
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BYTES + tl.arange(0, BYTES).to(tl.int64)
    j = tl.arange(0, PER)
    idx = byte[:, None] * PER + j[None, :]  # element index in memory order
    m = idx < numel
    k, t = idx % inner, idx // inner
    c, o = t % C, t // C
    y = tl.load(y_ptr + o * syo + c * syc + k * syi, mask=m, other=0.0).to(tl.float32)
    xh = (y - tl.load(mean_ptr + c)) * tl.load(invstd_ptr + c)
    z = xh * tl.load(gamma_ptr + c) + tl.load(beta_ptr + c)
    w = xh
    if RES:  # like the model: BN's output in y's dtype (Z_DT), then its add in the promoted dtype (S_DT)
        if Z_DT != "fp32":
            z = _round(z, Z_DT)
        z = z + tl.load(r_ptr + o * sro + c * src + k * sri, mask=m, other=0.0).to(tl.float32)
        if S_DT != "fp32":
            z = _round(z, S_DT)
        w = z
    if ACTIVATE:  # (else the caller activates: a join whose outliers are coded again from the sum)
        if ACT == "relu":
            z = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, like torch
        elif ACT == "relu6":
            z = tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))
    _store(out_ptr, idx, z, m)
    bm = byte < nbytes
    packed, v, q = _encode(w, p_ptr, c, C, m, j, BITS)
    tl.store(data_ptr + byte, packed, mask=bm)
    if CENT:  # the first n_stats elements (whole samples) feed the centroid tables
        _centroid_add(acc_ptr, v, q, p_ptr, c, C, idx < n_stats, BITS)
    if XH:
        packed, v, q = _encode(xh, xp_ptr, c, C, m, j, BITS)
        tl.store(xdata_ptr + byte, packed, mask=bm)
        if CENT:
            _centroid_add(xacc_ptr, v, q, xp_ptr, c, C, idx < n_stats, BITS)


@triton.jit
def _decode_fwd_kernel(
    out_ptr,
    mask_ptr,
    data_ptr,
    p_ptr,
    numel,
    nbytes,
    C,
    inner,
    ACT: tl.constexpr,
    VALUE: tl.constexpr,
    TABLE: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    BYTES: tl.constexpr = BLOCK // PER
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BYTES + tl.arange(0, BYTES).to(tl.int64)
    b = tl.load(data_ptr + byte, mask=byte < nbytes, other=0).to(tl.int32)
    j = tl.arange(0, PER)
    q = (b[:, None] >> (j[None, :] * BITS)) & ((1 << BITS) - 1)
    idx = byte[:, None] * PER + j[None, :]
    m = idx < numel
    c = (idx // inner) % C
    v, keep = _decode(q, p_ptr, c, C, VALUE, TABLE)
    if VALUE:  # w~ and the exact mask
        tl.store(out_ptr + idx, v, mask=m)
        tl.store(mask_ptr + idx, keep.to(tl.uint8), mask=m)
    else:  # a~ = A * f(v~) + B
        if ACT != "none":
            v = tl.maximum(v, 0.0)
        _store(out_ptr, idx, tl.load(p_ptr + C * _A + c) * v + tl.load(p_ptr + C * _B + c), m)


# ----------------------------------------------------------------------------------------------------------
# launchers


def _view3(x: torch.Tensor, perm) -> torch.Tensor:
    """``x`` as ``(outer, C, inner)`` in memory order ``perm`` (a view: any format, expanded tensors)."""
    xp = x.permute(perm)
    pos = perm.index(1)
    shape = (math.prod(xp.shape[:pos]), x.shape[1], math.prod(xp.shape[pos + 1 :]))
    try:
        return xp.view(shape)
    except RuntimeError:
        # Strides that no (outer, C, inner) view describes, e.g. an NCHW residual joined to a channels_last y:
        # one explicit dense copy in y's memory order (never the case for a conv output or its gradient).
        return xp.contiguous().view(shape)


_DT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _dtypes(y, residual) -> tuple[torch.dtype, dict]:
    """Dtype of the unit's output (y's, or the promotion of a join's add) and the kernels' Z_DT / S_DT names."""
    s = torch.promote_types(y.dtype, residual.dtype) if residual is not None else y.dtype
    return s, {"Z_DT": _DT_NAMES[y.dtype], "S_DT": _DT_NAMES[s]}


def _empty(shape, perm, dtype, device) -> torch.Tensor:
    """A fresh tensor of logical ``shape``, dense in memory order ``perm`` (so NCHW / channels_last is kept)."""
    return torch.empty([shape[d] for d in perm], dtype=dtype, device=device).permute(_inverse(perm))


def _tiles(kernel: str, x3: torch.Tensor, split: bool, **key):
    """Grid, tile count and tile sizes of ``x3`` (``(outer, C, inner)``) for ``kernel``; ``split``: a few programs
    per channel block that loop over the tiles (reductions), else one program per tile."""
    outer, C, inner = x3.shape
    cfg = launch_config(kernel, spatial=inner, channels=size_bucket(C), **key)  # inner == 1: channels_last
    p2 = triton.next_power_of_2
    BI = min(p2(inner), cfg["BLOCK"])
    BC = min(p2(C), max(cfg["BLOCK"] // BI, 1))
    BO = min(p2(outer), max(cfg["BLOCK"] // (BI * BC), 1))
    n_tiles = triton.cdiv(outer, BO) * triton.cdiv(inner, BI)
    n_cb = triton.cdiv(C, BC)
    if not split:
        n0 = n_tiles
    elif x3.device.type == "cuda":  # about 4 programs per SM in all
        n0 = min(n_tiles, triton.cdiv(4 * torch.cuda.get_device_properties(x3.device).multi_processor_count, n_cb))
    else:  # interpreter: a few partials per channel block, so that the two-stage reduction is exercised
        n0 = min(n_tiles, 3)
    return (max(n0, 1), n_cb), n_tiles, {"BO": BO, "BC": BC, "BI": BI, "num_warps": cfg["num_warps"]}


def bn_stats_forward(y, residual=None, mean=None, invstd=None, gamma=None, beta=None):
    """Per-channel ``(mean, var, min, max)`` of ``y``, or, when ``residual`` is given, of the join's sum
    ``s = z + residual`` with ``z = (y - mean) * invstd * gamma + beta`` rounded to y's dtype and the add rounded to
    the promoted dtype, like the model's own ops (``mean`` ... ``beta``: fp32 ``(C,)``). ``mean`` and the biased
    ``var`` come in float64, ``min``/``max`` in fp32."""
    perm = memory_order(y)
    y3 = _view3(y, perm)
    r3 = _view3(residual, perm) if residual is not None else y3
    outer, C, inner = y3.shape
    grid, n_tiles, meta = _tiles("bn_stats", y3, split=True)
    part = torch.empty(5, grid[0], C, dtype=torch.float32, device=y3.device)
    vecs = (mean, invstd, gamma, beta) if residual is not None else (part,) * 4
    _bn_stats_fwd_kernel[grid](
        part,
        y3,
        *y3.stride(),
        r3,
        *r3.stride(),
        *vecs,
        outer,
        C,
        inner,
        n_tiles,
        SUM=residual is not None,
        **_dtypes(y, residual)[1],
        **meta,
        **_EXACT,
    )
    n, mu, m2 = part[:3].double()
    tot = n.sum(0)
    mean64 = (n * mu).sum(0) / tot
    var64 = (m2 + n * (mu - mean64) ** 2).sum(0) / tot
    return mean64, var64, part[3].amin(0), part[4].amax(0)


def bn_act_forward(y, residual, mean, invstd, gamma, beta, P, xP, bits: int, act: str, out=None, activate=True):
    """The fused elementwise pass: ``(out, data, xdata)``; ``activate=False`` leaves ``out`` before the
    activation. ``out`` is in y's dtype, or for a join in the dtype of the model's add
    (``promote_types(y, residual)``); ``xdata`` (the xh code under ``xP``) is None without ``xP``.
    ``mean``, ``invstd``, ``gamma``, ``beta``: fp32 ``(C,)``; ``P``/``xP``: grids from ``reference.code_params``.
    A given ``out`` (e.g. a ring slot, or ``y`` itself: each element is read before it is written, by the same
    program) is written in place if it is dense in y's memory order, else copied into."""
    perm = memory_order(y)
    y3 = _view3(y, perm)
    r3 = _view3(residual, perm) if residual is not None else y3
    outer, C, inner = y3.shape
    numel = y.numel()
    nbytes = (numel * bits + 7) // 8
    out_dtype, dts = _dtypes(y, residual)
    dst = out
    if out is None or out.dtype != out_dtype or not out.permute(perm).is_contiguous():
        dst = _empty(y.shape, perm, out_dtype, y.device)
    data = torch.empty(nbytes, dtype=torch.uint8, device=y.device)
    xdata = torch.empty(nbytes, dtype=torch.uint8, device=y.device) if xP is not None else None
    cent = centroids.has_table(P, ref.PARAM_ROWS)
    acc = centroids.new_acc(bits, C, y.device) if cent else data
    xacc = centroids.new_acc(bits, C, y.device) if cent and xP is not None else acc
    n_stats = centroids.sample_limit(tuple(y.shape), perm, bits) * (numel // max(y.shape[0], 1))
    cfg = launch_config("bn_fwd", bits=bits, spatial=inner)
    grid = (max(1, triton.cdiv(numel, cfg["BLOCK"])),)
    _bn_act_fwd_kernel[grid](
        dst,
        data,
        xdata if xdata is not None else data,
        y3,
        *y3.stride(),
        r3,
        *r3.stride(),
        mean,
        invstd,
        gamma,
        beta,
        P,
        xP if xP is not None else P,
        acc,
        xacc,
        numel,
        nbytes,
        n_stats,
        C,
        inner,
        ACT=act,
        ACTIVATE=activate,
        RES=residual is not None,
        XH=xP is not None,
        CENT=cent,
        **dts,
        BITS=bits,
        BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"],
        **_EXACT,
    )
    if cent:
        centroids.finish_(P, acc, ref.PARAM_ROWS)
        if xP is not None:
            centroids.finish_(xP, xacc, ref.PARAM_ROWS)
    return (dst if out is None or dst is out else out.copy_(dst)), data, xdata


def _decode_launch(data, P, bits, shape, perm, act, dtype, value):
    perm = tuple(perm)
    numel, pos = math.prod(shape), perm.index(1)
    inner = math.prod(shape[d] for d in perm[pos + 1 :])
    out = _empty(shape, perm, dtype, data.device)
    mask = _empty(shape, perm, torch.uint8, data.device) if value else out
    cfg = launch_config("bn_decode", bits=bits, spatial=inner)
    _decode_fwd_kernel[(max(1, triton.cdiv(numel, cfg["BLOCK"])),)](
        out,
        mask,
        data,
        P,
        numel,
        data.numel(),
        shape[1],
        inner,
        ACT=act,
        VALUE=value,
        TABLE=centroids.has_table(P, ref.PARAM_ROWS),
        BITS=bits,
        BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"],
        **_EXACT,
    )
    return (out, mask.view(torch.bool)) if value else out


def decode_act(data, P, bits, shape, perm, act, dtype) -> torch.Tensor:
    """Bit-identical to ``reference.decode_act_ref``: ``a~`` in ``dtype``, in the memory format ``perm``."""
    return _decode_launch(data, P, bits, shape, perm, act, dtype, False)


def decode_value(data, P, bits, shape, perm, act=None):
    """Bit-identical to ``reference.decode_value_ref``: ``(w~ fp32, mask bool)`` in the memory format ``perm``.
    ``act`` is accepted for the reference's signature; the saturation test it lets the reference skip is a no-op
    on grids of other activations (``qtop = 2**bits - 1``)."""
    return _decode_launch(data, P, bits, shape, perm, "none", torch.float32, True)
