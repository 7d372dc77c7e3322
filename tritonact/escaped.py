"""The unit backward of codes with escaped values (``tritonact.outliers``) on the fast backends.

The compiled CPU graphs and the Triton kernels decode a code without its escapes: an escaped element reads code 0.
Instead of running the torch reference for the whole unit (about 8x the compiled backward's time), the backward runs
on the fast backend with the incoming gradient zeroed at the set ``E`` of escaped positions (of the unit's code, its
second code of ``xh`` and its residual's code), so those elements add nothing to the per-channel sums, whatever they
decode to. Their true contributions are computed here, element by element, and added to the sums before the input
gradient uses them (the compiled graphs take them as ``extra`` sums, the Triton kernels through their ``reduce``
hook). Then the input gradient (and a join's residual gradient) at ``E`` is overwritten with its true value::

    g_z[e] = g[e] * mask[e];   g_y[e] = gamma * invstd * (g_z[e] - sum_gz / M - xh[e] * sum_gzxh / M)

with ``mask`` and ``xh`` the exact ones at an escaped element (``escapes.apply_``'s) and the decoded ones elsewhere.
The result equals the reference's up to the order of the sums' additions.
"""

from __future__ import annotations

import math

import torch

from tritonact import centroids, escapes
from tritonact import reference as ref

__all__ = ["decode_at", "bn_act_backward"]


def _gather_codes(data: torch.Tensor, bits: int, idx: torch.Tensor) -> torch.Tensor:
    """Codes at flat indices ``idx`` (memory order) of packed ``data`` (``quant.pack_codes``: LSB first), int64."""
    per = 8 // bits
    if per == 1:
        return data[idx].long()
    return (data[idx // per].long() >> ((idx % per) * bits)) & ((1 << bits) - 1)


def decode_at(data, P, bits: int, shape, perm, act: str, idx: torch.Tensor, esc=None, activation: bool = False):
    """``(w~, mask)`` (fp32, fp32 0/1) of the elements at flat indices ``idx`` (memory order, int64) of a code,
    ``reference.decode_value_ref``'s values there; with ``activation``, ``a~`` (``reference.decode_act_ref``'s)
    instead of ``w~``. ``esc``: the code's escaped values, exact at their elements."""
    C = P.shape[1]
    c = escapes.channel_of(idx, shape, perm)
    rows = P[: ref.PARAM_ROWS, c]  # (one gather for every row)
    p = {name: rows[i] for i, name in enumerate(ref.ROWS)}
    q = _gather_codes(data, bits, idx)
    t = q.float() - p["nneg"]
    side = torch.sign(t + 0.5).clamp(min=0.0)
    off = P[ref.PARAM_ROWS :].reshape(-1)[q * C + c] if centroids.has_table(P, ref.PARAM_ROWS) else 0.5
    t = t + off
    v = (t * side) * p["dp"] + (t * (1.0 - side)) * p["dn"]
    mask = side
    if act in (None, "relu6"):
        sat = q.float() > p["qtop"]
        v = torch.where(sat, p["vhi"], v)
        mask = mask * (~sat)
    if escapes.count(esc):
        eidx = esc[:, 0].long()
        pos = torch.searchsorted(idx, eidx).clamp(max=max(idx.numel() - 1, 0))
        hit = idx[pos] == eidx
        pos, ev = pos[hit], esc[hit, 1].float()
        ve = (ev - p["o"][pos]) * p["sgn"][pos]
        sat = ve >= p["vhi"][pos]
        v[pos] = torch.where(sat, p["vhi"][pos], ve)
        mask[pos] = ((ve > 0) & ~sat).float()
    if activation:
        a = v.clamp(min=0.0) if act != "none" else v
        return a * p["A"] + p["B"], mask
    return v * p["sgn"] + p["o"], mask


def _flat(t: torch.Tensor, perm):
    """A view of ``t`` in memory order ``perm`` and a map from flat indices to its indices: flat where ``t`` is
    dense in that order, else unravelled (any strides)."""
    tp = t.permute(tuple(perm))
    if tp.is_contiguous():
        return tp.view(-1), lambda idx: idx
    return tp, lambda idx: tuple(torch.unravel_index(idx, tp.shape))


def bn_act_backward(
    be, g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, res_code, inplace, reduce, esc
):
    """``Backend.bn_act_backward``'s contract on backend ``be`` for codes with escapes: ``esc`` the unit's,
    ``xh_code`` ``(data, P, xesc)``, ``res_code`` a ``CodeRef`` with its ``esc``. None where ``be`` cannot take
    them (the torch backend, whose reference reads escapes itself; the compiled graphs with a ``reduce``, which one
    graph cannot call between its passes) or does not compile this input; the caller then runs the reference."""
    if be.name not in ("compiled", "triton") or (be.name == "compiled" and reduce is not None):
        return None
    shape, perm = tuple(shape), tuple(perm)
    xesc = xh_code[2] if xh_code is not None and len(xh_code) > 2 else None
    xh_code = None if xh_code is None else tuple(xh_code[:2])
    rc_loop = (
        be.name == "compiled"
        and res_code is not None
        and res_code.is_unit
        and (tuple(res_code.shape), tuple(res_code.perm), res_code.bits) == (shape, perm, bits)
    )
    if res_code is not None and not rc_loop:  # decoded with its escapes: exact where they are
        residual, res_code = be.decode(res_code, torch.float32), None
    res_esc = res_code.esc if res_code is not None else None
    parts = [e[:, 0].long() for e in (esc, xesc, res_esc) if escapes.count(e)]
    idx = torch.unique(torch.cat(parts))  # sorted
    c = escapes.channel_of(idx, shape, perm)

    # the true values at E
    w, mask = decode_at(data, P, bits, shape, perm, act, idx, esc)
    if xh_code is not None:
        xh = decode_at(*xh_code, bits, shape, perm, "none", idx, xesc)[0]
    elif residual is not None or res_code is not None:
        if res_code is not None:
            r = decode_at(res_code.data, res_code.P, bits, shape, perm, res_code.act, idx, res_esc, True)[0]
        else:
            rp, at = _flat(residual, perm)
            r = rp[at(idx)].float()
        g_safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
        xh = (w - r - beta[c]) / g_safe[c]
    else:
        xh = w

    # the gradient without E
    if inplace:
        g_in = g
    else:
        g_in = ref.empty_in(shape, perm, g.dtype, g.device).copy_(g)
    gp, at = _flat(g_in, perm)
    pos = at(idx)
    g_e = gp[pos].float()
    gp[pos] = 0
    g_z = g_e * mask if act != "none" else g_e
    C = shape[1]
    d_gz = torch.zeros(C, dtype=torch.float32, device=g.device).index_add_(0, c, g_z)
    d_gzxh = torch.zeros_like(d_gz).index_add_(0, c, g_z * xh)

    totals = {}

    def add_extra(s_gz, s_gzxh, M):
        s_gz, s_gzxh = s_gz + d_gz, s_gzxh + d_gzxh
        out = reduce(s_gz, s_gzxh, M) if reduce is not None else (s_gz, s_gzxh, M)
        totals["sums"] = out
        return out

    if be.name == "compiled":
        rc = (res_code.data, res_code.P, res_code.act) if res_code is not None else None
        from tritonact import compiled

        out = compiled.unit_backward(
            g_in, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, residual_code=rc,
            inplace=inplace, extra=torch.stack([d_gzxh, d_gz]),
        )  # fmt: skip
        if out is None:  # not compiled for this input: the caller runs the reference, on the gradient as given
            gp[pos] = g_e.to(gp.dtype)
            return None
        M = math.prod(shape) // C
        totals["sums"] = (out[2] + d_gz, out[1] + d_gzxh, M)
    else:
        out = be.bn_act_backward(
            g_in, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, None, inplace, add_extra
        )
    g_y, g_gamma, g_beta, g_res = out
    s_gz, s_gzxh, M = totals["sums"]
    k = (gamma * invstd)[c]
    g_ye = k * (g_z - (s_gz / M)[c] - xh * (s_gzxh / M)[c])
    yp, at_y = _flat(g_y, perm)
    yp[at_y(idx)] = g_ye.to(g_y.dtype)
    if g_res is not None:
        rp, at_r = _flat(g_res, perm)
        rp[at_r(idx)] = g_z.to(g_res.dtype)
    return g_y, g_gamma + d_gzxh, g_beta + d_gz, g_res
