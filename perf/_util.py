"""Timing and memory helpers shared by the benchmarks and perf/gpu_report.py (one place, so every number is
measured the same way).

* Timing synchronizes the device: a CUDA call is timed once its kernels have finished.
* Warm-up (Triton compilation, autotuning, cuDNN algorithm choice, allocator growth) happens before timing, and
  inputs are allocated outside the timed region.
* Bandwidth is ``bytes the op must move / median time``; peak memory is the most bytes one call allocated above what
  was allocated before it (its outputs and temporaries).
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable

import torch

MiB = 2.0**20

# On a GPU one benchmark round is this many back-to-back calls and one synchronize, so that the ~10 us of a
# synchronize does not dominate a ~100 us kernel; on CPU a round is one call.
GPU_CALLS_PER_ROUND = 10


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def synced(fn: Callable, device, calls: int = 1) -> Callable:
    """``fn`` called ``calls`` times, then a device synchronize, so a benchmark times finished work."""

    def run():
        out = None
        for _ in range(calls):
            out = fn()
        sync(device)
        return out

    return run


def median_s(benchmark) -> float | None:
    """Median seconds of a round from pytest-benchmark's stats (None when benchmarks are disabled)."""
    stats = getattr(benchmark, "stats", None)
    if not stats:
        return None
    return stats.stats.median


def record_bandwidth(benchmark, nbytes: int, calls: int = 1) -> None:
    """Put bytes moved per call and achieved GB/s (from the median round of ``calls`` calls) into extra_info."""
    benchmark.extra_info["bytes_moved"] = int(nbytes)
    benchmark.extra_info["calls_per_round"] = calls
    med = median_s(benchmark)
    if med:
        benchmark.extra_info["GB/s"] = round(nbytes * calls / med / 1e9, 3)


def bench_call(benchmark, fn: Callable, device, nbytes: int | None = None) -> None:
    """Benchmark ``fn`` (inputs already allocated) and record GB/s and its peak memory.

    CPU: pytest-benchmark's own calibration, one call per round. CUDA: ``GPU_CALLS_PER_ROUND`` calls per round (the
    reported time is for that many calls; ``extra_info["calls_per_round"]`` says so), after warm-up calls that
    finish compilation and autotuning."""
    calls = GPU_CALLS_PER_ROUND if is_cuda(device) else 1
    run = synced(fn, device, calls)
    if is_cuda(device):
        for _ in range(3):
            run()
        benchmark.pedantic(run, rounds=30, warmup_rounds=2)
    else:
        benchmark(run)
    if nbytes is not None:
        record_bandwidth(benchmark, nbytes, calls)
    benchmark.extra_info["peak_mib"] = round(peak_bytes(fn, device) / MiB, 3)


# ----------------------------------------------------------------------------------------------------------
# timing outside pytest-benchmark (perf/gpu_report.py, the interleaved ratio benchmark)


def time_s(fn: Callable, device, reps: int = 20, warmup: int = 3, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean seconds of ``reps`` back-to-back calls of ``fn`` (after ``warmup``
    calls). CUDA: CUDA events around the ``reps`` calls (no synchronize inside); CPU: ``perf_counter``."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        if is_cuda(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def timed(fn: Callable, device) -> float:
    """Seconds of one call of ``fn``, synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def copy_bandwidth(device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """The device's measured copy bandwidth in GB/s: ``dst.copy_(src)`` of ``nbytes`` (counted as read + write,
    2 * nbytes per copy), the yardstick the kernels' GB/s are compared with."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    s = time_s(lambda: dst.copy_(src), device, reps=reps, warmup=2, repeats=5)
    return 2 * src.numel() * 4 / s / 1e9


# ----------------------------------------------------------------------------------------------------------
# memory


def peak_bytes(fn: Callable, device) -> int:
    """Most bytes allocated at once during one call of ``fn``, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset; CPU: the peak of
    ``torch.distributed._tools.mem_tracker.MemTracker``, which sees every tensor made inside it."""
    if is_cuda(device):
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(max(peak, 0))
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    with mt:
        out = fn()
    del out
    snap = mt.get_tracker_snapshot("peak").get(torch.device(device), {})
    return int(snap.get("Total", 0))


class memory_budget:
    """Cap this process's CUDA caching allocator at ``budget`` bytes while active (``set_per_process_memory_fraction``),
    so that a step needing more raises ``torch.cuda.OutOfMemoryError`` instead of borrowing the rest of the GPU.
    A no-op on CPU."""

    def __init__(self, budget: int, device):
        self.budget, self.device = int(budget), torch.device(device)

    def __enter__(self):
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.budget / total), self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            torch.cuda.empty_cache()
        return False


# ----------------------------------------------------------------------------------------------------------
# machine


def machine_slug() -> str:
    """Name of this machine's baseline folder: the GPU's name (``nvidia-h200``), else ``cpu-<n>cores``.
    ``TRITONACT_BENCH_MACHINE`` overrides it."""
    name = os.environ.get("TRITONACT_BENCH_MACHINE")
    if not name:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{os.cpu_count()}cores"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


if __name__ == "__main__":  # `python perf/_util.py`: the baseline folder name (used by perf/compare.sh)
    print(machine_slug())
