"""Peak memory of one training step vs batch size, by training mode (writes the peak table of docs/memory.md).

    python -m perf.memory_table [--batches 4 8 16 32] [--size 128] [--model resnet50]
                                [--modes exact 8bit 4bit 2bit checkpoint 4bit-ring]

Modes: ``exact``; ``8bit`` / ``4bit`` / ``2bit`` (``tritonact.approximate``); ``checkpoint`` (each of layer1..layer4
under ``torch.utils.checkpoint``, measured in the same run); ``4bit-ring`` (4 bits with ``ring=True``). On CPU the
peak comes from MemTracker (``tritonact.peak_memory``): the most that activations and temporaries held together at
any moment of the step. Prints a markdown table, the slope of the peak between the first and last batch (bytes per
extra sample) and each mode's slope ratio to exact.
"""

from __future__ import annotations

import argparse
import platform

import torch

import tritonact
from perf._util import MiB
from perf._workloads import build_model, make_batch, training_mode

MODES = ("exact", "8bit", "4bit", "2bit", "checkpoint", "4bit-ring")


def measure(model, batches, size, mode):
    """``[(batch, activations + temporaries peak in bytes)]``; a warm-up step first at each batch (allocator,
    lazy init, ring buffers)."""
    rows = []
    base, ring = mode.removesuffix("-ring"), mode.endswith("-ring")
    for n in batches:
        x, y = make_batch(n, size, "cpu", seed=n)
        with training_mode(model, base, **({"ring": True} if ring else {})):
            tritonact.peak_memory(model, x, y)
            r = tritonact.peak_memory(model, x, y)
        rows.append((n, r["activations_temporaries_peak"]))
        print(f"  {mode:>10} batch {n:>3}: act+temp peak {rows[-1][1] / MiB:8.1f} MiB", flush=True)
    return rows


def slope(rows) -> float:
    (n0, a), (n1, b) = rows[0], rows[-1]
    return (b - a) / (n1 - n0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, "cpu")
    results = {m: measure(model, args.batches, args.size, m) for m in args.modes}
    print(
        f"\n{args.model}, {args.size}x{args.size}, fp32, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; MemTracker activations + temporaries peak, "
        "MiB\n"
    )
    print("| batch | " + " | ".join(args.modes) + " |")
    print("| --- " * (len(args.modes) + 1) + "|")
    for i, n in enumerate(args.batches):
        print(f"| {n} | " + " | ".join(f"{results[m][i][1] / MiB:.1f}" for m in args.modes) + " |")
    slopes = {m: slope(results[m]) for m in args.modes}
    print(f"| slope, MiB per sample ({args.batches[0]} -> {args.batches[-1]}) | "
          + " | ".join(f"{slopes[m] / MiB:.2f}" for m in args.modes) + " |")  # fmt: skip
    if "exact" in slopes:
        print("| exact / mode | " + " | ".join(f"{slopes['exact'] / slopes[m]:.2f}x" for m in args.modes) + " |")


if __name__ == "__main__":
    main()
