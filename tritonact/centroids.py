"""Centroid decoding: each code decodes to the mean of the values that produced it, not to its bin's midpoint.

A unit's grid ``P`` (:mod:`tritonact.reference`) may carry ``2**bits`` extra rows after its ``PARAM_ROWS``: row
``PARAM_ROWS + q`` holds, per channel, the **offset** ``off[q]`` of code ``q``'s decoded value inside its bin, in
units of the bin's step, measured like the midpoint's ``0.5``::

    t  = (q - nneg) + off[q]                       # midpoint decoding: off[q] = 0.5
    v~ = t * (dp if q >= nneg else dn)             # the side is the code's, never t's sign

The encoder measures it. For each coded element that is not ReLU6-saturated and whose offset is finite::

    r    = rdp if q >= nneg else rdn
    e    = v * r - (q - nneg)                      # the element's own offset (fp32, the encoder's product v * r)
    f    = floor(clamp(e, -LIMIT, LIMIT) * SCALE + 0.5)      # fixed point, an integer up to 2**24 (exact in fp32)
    sum[c, q] += f;  count[c, q] += 1
    off[q] = (sum / count) / SCALE   (float64, then fp32);  0.5 where count == 0

Integer sums do not depend on the order of the additions, so every backend (torch, the compiled CPU graphs, Triton
atomics on the GPU and under the interpreter) gets the same table bit for bit. End bins collect the clipped tails:
their offsets leave ``[0, 1]`` and they decode to the mean of what was clipped into them. The statistics see the
first :func:`sample_limit` samples of the batch (all of them unless the batch holds more than ``VALUES[bits]`` values
per channel without them), so their cost stops growing with the batch.

The table costs ``4 * 2**bits`` bytes per channel (64 at 4 bits), independent of the batch, and is counted wherever
the codes are (it is part of ``P``, which autograd saves).
"""

from __future__ import annotations

import math

import torch

__all__ = ["SCALE", "LIMIT", "VALUES", "has_table", "sample_limit", "contributions", "new_acc",
           "accumulate_", "finish_", "lookup"]  # fmt: skip

SCALE = 4096.0  # 1/4096 of a bin: a decoded value is within 1/8192 of a bin of the exact mean
LIMIT = 4096.0  # |offset| bound in bins: LIMIT * SCALE = 2**24, so f is an exact fp32 integer, its sums exact in
# float64 (below 2**53 for up to 2**29 values per bin); a value further out counts as LIMIT bins from its bin
# Values per channel the statistics see at least (in whole samples), by code width, when the batch has more. On
# the compiled CPU path they cost ~90 ms of a resnet50 16 x 128x128 step at 4 bits with 1,024 (one thread; 21 M
# values, ~2.5-3 ns each: the graph, then one bincount). Conv gradient median / max, resnet50, 4 bits: at 8 x 64x64
# (seeds 0-2) 0.1068 / 0.1595 with every value, 0.1068 / 0.1645 with 1,024, 0.1068 / 0.1659 with 256; at 8 x
# 128x128 (seed 0) 0.1093 / 0.1528 with every value, 0.1102 / 0.1561 with 1,024, 0.1138 / 0.1563 with 256
# (midpoints 0.1141: the deep layers' tables need many samples); with two codes at the deepest joins, 16 x 128x128
# (seed 0, medians): 0.0986 with 1,024, 0.0999 with 512, 0.1015 with 256, midpoints 0.1120. resnet18, 2 bits, seed
# 0: 0.351 with 1,024, 0.354 with 256 (midpoints 0.369); 8 bits 0.0044 with 1,024, 0.0066 with 256 (one value per
# code; midpoints 0.0067).
VALUES = {2: 1 << 10, 4: 1 << 10, 8: 1 << 12}


def has_table(P: torch.Tensor, param_rows: int) -> bool:
    return P.shape[0] > param_rows


def sample_limit(shape, perm, bits: int) -> int:
    """How many leading samples feed the statistics: enough for ``VALUES[bits]`` values per channel, all of them
    when the batch is not the outermost dim in memory (then no prefix of the codes is a set of samples)."""
    N = shape[0]
    if not perm or perm[0] != 0:
        return N
    per_channel = math.prod(shape[2:])
    return min(N, max(1, -(-VALUES[bits] // max(per_channel, 1))))


def contributions(v: torch.Tensor, q: torch.Tensor, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, keep)``: each element's fixed-point offset (fp32 integers) and whether it counts (fp32 0/1), from the
    coded value ``v`` and code ``q`` (fp32, same shape) and the grid's rows ``p`` viewed to broadcast."""
    nneg = p["nneg"]
    pos = q >= nneg
    e = torch.where(pos, v * p["rdp"], v * p["rdn"]) - (q - nneg)
    keep = torch.isfinite(e) & (q <= p["qtop"])
    f = torch.floor(e.clamp(-LIMIT, LIMIT) * SCALE + 0.5)
    return torch.where(keep, f, 0.0), keep.float()


def new_acc(bits: int, C: int, device) -> torch.Tensor:
    """``(2, 2**bits * C)`` float64 zeros: sums and counts, code-major (index ``q * C + c``)."""
    return torch.zeros(2, (1 << bits) * C, dtype=torch.float64, device=device)


def accumulate_(acc: torch.Tensor, f: torch.Tensor, keep: torch.Tensor, q: torch.Tensor, channel: torch.Tensor, C: int):
    """Add elements' contributions to ``acc``; ``channel`` is each element's channel index (int64, broadcastable)."""
    key = (q.long() * C + channel).expand(q.shape).reshape(-1)
    acc[0].scatter_add_(0, key, f.reshape(-1).double())
    acc[1].scatter_add_(0, key, keep.reshape(-1).double())
    return acc


def finish_(P: torch.Tensor, acc, param_rows: int, channel_major: bool = False) -> torch.Tensor:
    """Write the offsets of ``acc`` (sums and counts, ``acc[0]`` and ``acc[1]``, ``2**bits * C`` each, code-major, or
    channel-major (index ``c * 2**bits + q``) with ``channel_major``) into the table rows of ``P``
    (``(param_rows + L, C)``); returns ``P``."""
    L, C = P.shape[0] - param_rows, P.shape[1]
    s, n = acc[0], acc[1]
    off = torch.where(n > 0, (s / n.clamp(min=1.0)) / SCALE, 0.5).float()
    P[param_rows:] = off.view(C, L).t() if channel_major else off.view(L, C)
    return P


def lookup(P: torch.Tensor, q: torch.Tensor, channel: torch.Tensor, param_rows: int) -> torch.Tensor:
    """``off[q]`` of each element (fp32): ``q`` its code, ``channel`` its channel index (broadcastable, int64)."""
    C = P.shape[1]
    return P[param_rows:].reshape(-1)[q.long() * C + channel]
