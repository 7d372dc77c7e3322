"""Timing and memory helpers shared by the benchmarks (one place, so every benchmark measures the same way)."""

from __future__ import annotations

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def synced(fn, device):
    """``fn`` followed by a device synchronize, so a benchmark times finished work."""

    def run():
        out = fn()
        sync(device)
        return out

    return run


def median_s(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if not stats:
        return None
    return stats.stats.median


def record_bandwidth(benchmark, nbytes: int) -> None:
    """Put bytes moved and achieved GB/s (from the median) into the benchmark's extra_info."""
    benchmark.extra_info["bytes_moved"] = int(nbytes)
    med = median_s(benchmark)
    if med:
        benchmark.extra_info["GB/s"] = round(nbytes / med / 1e9, 3)
