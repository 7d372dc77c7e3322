"""Batch statistics across processes, for units made from ``nn.SyncBatchNorm``.

A ``SyncBatchNorm`` unit normalizes with the statistics of the whole global batch, as ``nn.SyncBatchNorm`` does:
each rank's per-channel mean, biased variance and count are all-gathered and combined (in float64, by the parallel
variance formula); the running statistics are updated with that mean and the unbiased variance of the global
batch. Its backward all-reduces the two per-channel sums of the BN input gradient (``sum(g_z)``,
``sum(g_z * xh)``) between its two passes; the gamma / beta gradients stay this rank's own (DDP averages them,
as it does ``nn.SyncBatchNorm``'s). Unlike PyTorch's ``SyncBatchNorm``, this also runs on CPU tensors (gloo).

Process groups cannot cross an op boundary, so the ops take a key (a string) and look the group up here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["group_key", "global_stats", "all_reduce_sums", "EmptyBatch"]

_GROUPS: dict[str, object] = {}


def group_key(bn: nn.Module) -> str:
    """The key of the process group ``bn`` synchronizes over in this call, or ``""`` where it does not (not a
    ``SyncBatchNorm``, no process group initialized, or a world of one process: then it is a plain BatchNorm, as in
    ``nn.SyncBatchNorm.forward``)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not dist.is_available() or not dist.is_initialized():
        return ""
    group = bn.process_group or dist.group.WORLD
    if dist.get_world_size(group) < 2:
        return ""
    key = f"pg{id(group)}"
    _GROUPS[key] = group
    return key


def _group(key: str):
    try:
        return _GROUPS[key]
    except KeyError:
        raise RuntimeError(f"tritonact: unknown process group key {key!r} (keys come from group_key)") from None


def global_stats(y: torch.Tensor, key: str, eps: float, eaf: float, rm, rv):
    """``(mean, invstd, new_rm, new_rv, var)`` of the global batch: ``mean``, ``invstd`` and the biased ``var``
    fp32 ``(C,)``, the running statistics after this batch in their own dtype (None without them). Every rank of
    the group must call it."""
    group = _group(key)
    C = y.shape[1]
    dims = [d for d in range(y.dim()) if d != 1]
    n = y.numel() // C
    if n:
        var, mean = torch.var_mean(y, dim=dims, unbiased=False)
    else:  # an empty batch on this rank: it counts for nothing, but takes part
        var = mean = torch.zeros(C, dtype=y.dtype, device=y.device)
    mine = torch.cat([mean.double(), var.double(), torch.full((1,), float(n), dtype=torch.float64, device=y.device)])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    stats = torch.stack(parts)  # (world, 2C + 1)
    means, variances, counts = stats[:, :C], stats[:, C : 2 * C], stats[:, 2 * C :]
    total = counts.sum()
    g_mean = (counts * means).sum(0) / total
    g_var = (counts * (variances + (means - g_mean) ** 2)).sum(0) / total  # biased
    invstd = (g_var + eps).rsqrt().float()
    new_rm = new_rv = None
    if rm is not None:
        unbiased = g_var * (total / (total - 1).clamp(min=1.0))
        new_rm = (eaf * g_mean + (1.0 - eaf) * rm.double()).to(rm.dtype)
        new_rv = (eaf * unbiased + (1.0 - eaf) * rv.double()).to(rv.dtype)
    return g_mean.float(), invstd, new_rm, new_rv, g_var.float()


def all_reduce_sums(key: str, sum_gz: torch.Tensor, sum_gzxh: torch.Tensor, count: int):
    """``(sum_gz, sum_gzxh, count)`` summed over the group: fp32 sums (reduced in float64) and the global number
    of values per channel as a 0-d float64 tensor (no host sync); ``count``: this rank's."""
    C = sum_gz.numel()
    both = torch.cat([sum_gz.double(), sum_gzxh.double(), sum_gz.new_full((1,), float(count), dtype=torch.float64)])
    dist.all_reduce(both, group=_group(key))
    return both[:C].float(), both[C : 2 * C].float(), both[2 * C]


class EmptyBatch(torch.autograd.Function):
    """A SyncBatchNorm unit on a rank whose batch is empty: it takes part in the statistics' all-gather (count 0,
    and updates its running statistics as the other ranks do) and in the backward's all-reduce (zeros), so that the
    other ranks do not wait for it forever; its output is empty. ``eaf``: the exponential average factor."""

    @staticmethod
    def forward(ctx, y, key: str, eps: float, eaf: float, rm, rv, dtype):
        _, _, new_rm, new_rv, _ = global_stats(y, key, eps, eaf, rm, rv)
        if rm is not None:
            rm.copy_(new_rm)
            rv.copy_(new_rv)
        ctx.key, ctx.C = key, y.shape[1]
        return torch.empty_like(y, dtype=dtype)

    @staticmethod
    def backward(ctx, g):
        zeros = torch.zeros(ctx.C, dtype=torch.float32, device=g.device)
        all_reduce_sums(ctx.key, zeros, zeros, 0)
        return torch.zeros_like(g), None, None, None, None, None, None
