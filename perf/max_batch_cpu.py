"""Largest batch whose whole training step fits a memory budget, on CPU (MemTracker's peak of the step), exact vs
tritonact vs torch.utils.checkpoint per stage (docs/memory.md, "Max batch").

    python -m perf.max_batch_cpu [--model resnet50] [--res 128] [--budget-mib 1024] [--modes exact 4bit checkpoint]

Each probe runs one real training step (SGD with momentum, fresh optimizer and context) and asks
``tritonact.peak_memory`` for its peak (weights, gradients, optimizer state, activations, temporaries); the batch is
found by doubling then bisection (``perf/_workloads.max_batch``, within 1/32).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from perf._util import MiB
from perf._workloads import MODES, max_batch_in_budget


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--budget-mib", type=int, default=1024)
    ap.add_argument("--modes", nargs="+", default=["exact", "8bit", "4bit", "2bit", "checkpoint"], choices=MODES)
    ap.add_argument("--cap", type=int, default=2048)
    args = ap.parse_args(argv)
    budget = args.budget_mib * MiB
    found = {}
    for mode in args.modes:
        t0 = time.perf_counter()
        found[mode] = r = max_batch_in_budget(args.model, mode, budget, args.res, "cpu", cap=args.cap)
        print(f"  {mode:>10}: max batch {r['max_batch']} ({len(r['probes'])} probes, {time.perf_counter() - t0:.0f} s)",
              flush=True)  # fmt: skip
    print(
        f"\n{args.model}, {args.res}x{args.res}, fp32, budget {args.budget_mib} MiB (whole step, MemTracker), "
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print("| mode | max batch | x exact |")
    print("| --- | --- | --- |")
    base = found.get("exact", {}).get("max_batch") or None
    for mode, r in found.items():
        ratio = f"{r['max_batch'] / base:.2f}x" if base else "-"
        print(f"| {mode} | {r['max_batch']} | {ratio} |")


if __name__ == "__main__":
    main()
