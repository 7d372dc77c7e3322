"""Device helpers of the fused BN (+ add) + activation kernels (``bn_act.py``, ``bn_act_bwd.py``): tile indices,
the encoder, the centroid statistics, the decoder, rounding and stores. Contracts: ``tritonact.reference``."""

from __future__ import annotations

import triton
import triton.language as tl
from tritonact.kernels.quantize import _round_to_bf16

from tritonact import centroids
from tritonact import reference as ref

# rows of the (PARAM_ROWS, C) grid tensor, as laid out by reference.ROWS
_O, _SGN, _RDP, _RDN, _DP, _DN, _NNEG, _QTOP, _VHI, _A, _B = (
    tl.constexpr(ref.R[n]) for n in ("o", "sgn", "rdp", "rdn", "dp", "dn", "nneg", "qtop", "vhi", "A", "B")
)  # (row "out" is read by tritonact.outliers only)
_ROWS: tl.constexpr = tl.constexpr(ref.PARAM_ROWS)
_SCALE: tl.constexpr = tl.constexpr(centroids.SCALE)
_LIMIT: tl.constexpr = tl.constexpr(centroids.LIMIT)
_EXACT = {"enable_fp_fusion": False}  # GPU: no FMA contraction, so results match torch's op-by-op rounding


# ----------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _tile(t, cb, outer, C, inner, BO: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr):
    """Indices ``(o, c, k)`` (int64, broadcast to ``[BO, BC, BI]``) and mask of tile ``t`` of channel block ``cb``."""
    n_ib = (inner + BI - 1) // BI  # not tl.cdiv: a nested jit call is slow under the interpreter
    o = (t // n_ib).to(tl.int64) * BO + tl.arange(0, BO)
    k = (t % n_ib).to(tl.int64) * BI + tl.arange(0, BI)
    c = cb.to(tl.int64) * BC + tl.arange(0, BC)
    o3, c3, k3 = o[:, None, None], c[None, :, None], k[None, None, :]
    return o3, c3, k3, (o3 < outer) & (c3 < C) & (k3 < inner)


# Helpers stay few and coarse: under the interpreter every nested @triton.jit call costs milliseconds. Grid rows are
# loaded as ``p_ptr + C * row + c`` with ``c`` always a valid channel where the mask ``c < C`` is not given.


@triton.jit
def _encode(w, p_ptr, c, C, m, j, BITS: tl.constexpr):
    """``(packed, v, q)``: packed codes (one byte per row of ``[BYTES, PER]``) in the op order of
    ``reference.encode_ref`` (masked: 0), the coded value ``v`` and the codes ``q`` (fp32) for ``_centroid_add``."""
    L1: tl.constexpr = (1 << BITS) - 1
    nneg = tl.load(p_ptr + C * _NNEG + c)
    v = (w - tl.load(p_ptr + C * _O + c)) * tl.load(p_ptr + C * _SGN + c)
    qp = nneg + tl.minimum(tl.floor(v * tl.load(p_ptr + C * _RDP + c)), tl.load(p_ptr + C * _QTOP + c) - nneg)
    qn = nneg - 1.0 - tl.minimum(tl.floor(-v * tl.load(p_ptr + C * _RDN + c)), nneg - 1.0)
    q = tl.where(v > 0, qp, qn)
    q = tl.where(v >= tl.load(p_ptr + C * _VHI + c), L1 * 1.0, q)
    q = tl.minimum(tl.maximum(q, 0.0), L1 * 1.0)
    q = tl.where((v != v) | (~m), 0.0, q)
    return tl.sum(q.to(tl.int32) << (j[None, :] * BITS), axis=1).to(tl.uint8), v, q


@triton.jit
def _centroid_add(acc_ptr, v, q, p_ptr, c, C, m, BITS: tl.constexpr):
    """Add the centroid contributions (``tritonact.centroids``) of the elements ``m`` selects to ``acc``, from their
    coded values ``v`` and codes ``q`` (``_encode``'s)."""
    L1: tl.constexpr = (1 << BITS) - 1
    nneg = tl.load(p_ptr + C * _NNEG + c)
    qtop = tl.load(p_ptr + C * _QTOP + c)
    rdp = tl.load(p_ptr + C * _RDP + c)
    rdn = tl.load(p_ptr + C * _RDN + c)
    pos = q >= nneg
    e = tl.where(pos, v * rdp, v * rdn) - (q - nneg)
    keep = m & (e == e) & (tl.abs(e) != float("inf")) & (q <= qtop)
    f = tl.floor(tl.minimum(tl.maximum(e, -_LIMIT), _LIMIT) * _SCALE + 0.5)
    key = q.to(tl.int64) * C + c
    tl.atomic_add(acc_ptr + key, f.to(tl.float64), mask=keep)
    tl.atomic_add(acc_ptr + (L1 + 1) * C + key, tl.where(keep, 1.0, 0.0).to(tl.float64), mask=keep)


@triton.jit
def _decode(q, p_ptr, c, C, VALUE: tl.constexpr, TABLE: tl.constexpr = False):
    """``(v~, mask)`` of int32 codes ``q`` in the op order of ``reference._decode_v``; with VALUE, ``v~`` is replaced
    by ``w~ = o + sgn * v~``."""
    cm = c < C
    qf = q.to(tl.float32)
    nneg = tl.load(p_ptr + C * _NNEG + c, mask=cm, other=0.0)
    pos = qf >= nneg
    sat = qf > tl.load(p_ptr + C * _QTOP + c, mask=cm, other=0.0)
    dp = tl.load(p_ptr + C * _DP + c, mask=cm, other=0.0)
    step = tl.where(pos, dp, tl.load(p_ptr + C * _DN + c, mask=cm, other=0.0))
    if TABLE:  # the code's centroid offset (tritonact.centroids), row PARAM_ROWS + q
        off = tl.load(p_ptr + C * (_ROWS + q.to(tl.int64)) + c, mask=cm, other=0.5)
    else:
        off = 0.5
    v = tl.where(sat, tl.load(p_ptr + C * _VHI + c, mask=cm, other=0.0), ((qf - nneg) + off) * step)
    if VALUE:
        v = tl.load(p_ptr + C * _O + c, mask=cm, other=0.0) + tl.load(p_ptr + C * _SGN + c, mask=cm, other=0.0) * v
    return v, pos & (~sat)


@triton.jit
def _round(v, DT: tl.constexpr):
    """fp32 ``v`` rounded (to nearest even, like torch) to the dtype named DT, kept in fp32."""
    if DT == "bf16":
        v = _round_to_bf16(v)
    elif DT == "fp16":
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _store(ptr, off, v, m):
    if ptr.dtype.element_ty == tl.bfloat16:
        v = _round_to_bf16(v)  # the interpreter's fp32 -> bf16 cast truncates; torch and the GPU round
    tl.store(ptr + off, v.to(ptr.dtype.element_ty), mask=m)
