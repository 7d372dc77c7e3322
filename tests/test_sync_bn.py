"""``nn.SyncBatchNorm`` units: the global batch's statistics across processes (gloo, 2 CPU processes), and plain
BatchNorm behaviour in a single process."""

from __future__ import annotations

import copy
import socket
import statistics

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tritonact

N, SIZE, WORLD = 4, 32, 2  # samples per rank, input size


def _model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _batch(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(N, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (N,), generator=g)


def _rank(rank, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y = _batch(rank)
        result = {}
        for bits in (8, 4):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(_model())
            with tritonact.approximate(model, bits=bits, compile=False) as ctx:
                logits = model(x)
                F.cross_entropy(logits, y).backward()
            for p in model.parameters():  # what DDP does (it refuses SyncBatchNorm in a CPU module)
                dist.all_reduce(p.grad)
                p.grad /= WORLD
            result[bits] = {
                "units": len(ctx.report().units),
                "logits": logits.detach(),
                "grads": {n: p.grad for n, p in model.named_parameters()},
                "buffers": {n: b.clone() for n, b in model.named_buffers()},
            }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def test_sync_batchnorm_units_use_the_global_batch(tmp_path):
    """Data-parallel training over 2 gloo processes, each with 4 samples, against one process training the model
    with BatchNorm2d on the 8 samples (what SyncBatchNorm computes; PyTorch's own SyncBatchNorm refuses CPU
    tensors): every SyncBatchNorm is a unit, the forward matches, running statistics match, gradients are equal
    on both ranks and within the approximation's error of the exact ones."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))

    exact = _model()
    (x0, y0), (x1, y1) = _batch(0), _batch(1)
    logits = exact(torch.cat([x0, x1]))
    F.cross_entropy(logits, torch.cat([y0, y1])).backward()  # = the mean of the ranks' losses (equal batches)
    want = {n: p.grad for n, p in exact.named_parameters()}
    # (statistics: fp64 combination of per-rank mean / variance vs one fp32 pass: rounding only)
    for bits, limit in ((8, 0.03), (4, 0.20)):  # the conv weight gradient medians docs/coverage.md holds models to
        a, b = r0[bits], r1[bits]
        assert a["units"] == b["units"] == 20
        torch.testing.assert_close(a["logits"], logits[:N].detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b["logits"], logits[N:].detach(), rtol=1e-4, atol=1e-5)
        for n, buf in exact.named_buffers():
            torch.testing.assert_close(a["buffers"][n], buf, rtol=1e-4, atol=1e-6, msg=n)
        for n, g in a["grads"].items():
            assert torch.equal(g, b["grads"][n]), n
        conv = [_rel(a["grads"][n], want[n]) for n in want if n.endswith("weight") and want[n].dim() == 4]
        assert statistics.median(conv) <= limit, (bits, statistics.median(conv))
        assert max(_rel(a["grads"][n], want[n]) for n in want) < 4 * limit, bits


def test_sync_batchnorm_in_one_process_is_a_plain_batchnorm_unit():
    """Without a process group (or in a world of one) a SyncBatchNorm normalizes with its own batch, as PyTorch's
    does: its unit computes exactly what the BatchNorm2d unit does."""
    model = _model()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    x, y = _batch(0)
    for m in (model, synced):
        with tritonact.approximate(m, bits=4) as ctx:
            F.cross_entropy(m(x), y).backward()
        assert len(ctx.report().units) == 20 and not ctx.report().exact
    for (n, a), b in zip(model.named_parameters(), synced.parameters()):
        assert torch.equal(a.grad, b.grad), n
    for (n, a), b in zip(model.named_buffers(), synced.buffers()):
        assert torch.equal(a, b), n


def _empty_rank(rank, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y = _batch(0)
        if rank == 1:
            x, y = x[:0], y[:0]
        model = nn.SyncBatchNorm.convert_sync_batchnorm(_model())
        with tritonact.approximate(model, bits=4, compile=False):
            F.cross_entropy(model(x), y, reduction="sum").div(N).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        torch.save({"grads": grads, "buffers": dict(model.named_buffers())}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_rank_with_an_empty_batch_takes_part_and_does_not_hang(tmp_path):
    """Rank 1's batch is empty: it takes part in every unit's all-gather and all-reduce (else rank 0 would wait
    forever), both ranks end with the same running statistics, those of rank 0's batch alone, and rank 0's
    gradients are those of its batch, within the 4-bit error of exact training on it."""
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_empty_rank, args=(port, str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120  # a few seconds when it works; a hang is the failure
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("a rank waited forever for a collective")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    exact = _model()
    x, y = _batch(0)
    F.cross_entropy(exact(x), y).backward()
    for n, buf in exact.named_buffers():
        torch.testing.assert_close(r0["buffers"][n], buf, rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(r1["buffers"][n], r0["buffers"][n], rtol=0, atol=0, msg=n)
    want = {n: p.grad for n, p in exact.named_parameters()}
    conv = [_rel(r0["grads"][n], want[n]) for n in want if n.endswith("weight") and want[n].dim() == 4]
    assert statistics.median(conv) <= 0.20
    assert all(not g.any() for g in r1["grads"].values() if g is not None)
