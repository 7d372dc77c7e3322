"""Escaped values of a code (``tritonact.outliers``): ``esc`` is a float64 ``(E, 2)`` tensor of rows ``(flat index
in memory order, exact value)``; no rows (the normal case) means none."""

from __future__ import annotations

import math

import torch

__all__ = ["none", "count", "channel_of", "select", "apply_", "apply_act_"]


def none(like: torch.Tensor) -> torch.Tensor:
    """An empty ``esc`` (no escapes) on ``like``'s device."""
    return like.new_empty((0, 2), dtype=torch.float64)


def count(esc: torch.Tensor | None) -> int:
    return 0 if esc is None else int(esc.shape[0])


def channel_of(idx: torch.Tensor, shape, perm) -> torch.Tensor:
    perm_shape = [shape[d] for d in perm]
    k = list(perm).index(1)
    inner = math.prod(perm_shape[k + 1 :])
    return (idx // inner) % shape[1]


def select(esc: torch.Tensor | None, n0: int, n1: int, shape, perm) -> torch.Tensor | None:
    """The escapes of samples ``[n0, n1)`` of a code of logical ``shape``, indexed within them (the batch is the
    outermost dim in memory, ``perm[0] == 0``, wherever a code is decoded in sample ranges)."""
    if count(esc) == 0 or (n0, n1) == (0, shape[0]):
        return esc
    per = math.prod(shape[1:])
    idx = esc[:, 0]
    keep = (idx >= n0 * per) & (idx < n1 * per)
    sub = esc[keep].clone()
    sub[:, 0] -= n0 * per
    return sub


def apply_(v: torch.Tensor, mask: torch.Tensor, o, sgn, vhi, esc: torch.Tensor | None, perm) -> None:
    """Write the escaped values into a decode's ``v~`` and mask (both contiguous in memory order ``perm``'s view,
    ``reference._decode_v``), from the grid's rows ``o``, ``sgn``, ``vhi`` (``(C,)``): ``v = (w - o) * sgn``
    exactly, limited to ``vhi`` (ReLU6's saturation, as the top code decodes), and the mask ``0 < v < vhi``."""
    if count(esc) == 0:
        return
    idx = esc[:, 0].long()
    shape = [0] * len(perm)
    for i, d in enumerate(perm):
        shape[d] = v.shape[i]
    c = channel_of(idx, shape, perm)
    o, sgn, vhi = o[c], sgn[c], vhi[c]
    ve = (esc[:, 1].float() - o) * sgn
    sat = ve >= vhi
    v.view(-1)[idx] = torch.where(sat, vhi, ve)
    mask.view(-1)[idx] = ((ve > 0) & ~sat).to(mask.dtype)


def apply_act_(a: torch.Tensor, P: torch.Tensor, rows: dict, act: str, esc: torch.Tensor | None, perm) -> torch.Tensor:
    """Write the escaped values' activations into a decoded activation ``a`` (logical shape, dense in memory order
    ``perm``) decoded without them: ``A * f(v) + B`` per channel from ``P``'s rows (``rows``: their indices), ``v`` as
    :func:`apply_` gives it and ``f`` the ReLU unless ``act`` is ``"none"``: the values
    ``reference.decode_act_ref`` gives those elements, in ``a``'s dtype. Returns ``a``."""
    if count(esc) == 0:
        return a
    idx = esc[:, 0].long()
    c = channel_of(idx, a.shape, perm)
    vhi = P[rows["vhi"]][c]
    ve = (esc[:, 1].float() - P[rows["o"]][c]) * P[rows["sgn"]][c]
    v = torch.where(ve >= vhi, vhi, ve)
    if act != "none":
        v = v.clamp(min=0.0)
    a.permute(perm).view(-1)[idx] = (v * P[rows["A"]][c] + P[rows["B"]][c]).to(a.dtype)
    return a
