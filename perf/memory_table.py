"""Peak memory of one training step vs batch size, exact vs tritonact (writes the table of docs/memory.md).

    python perf/memory_table.py [--batches 4 8 16 32] [--size 128] [--bits 4] [--model resnet50]

On CPU the peak comes from MemTracker (``tritonact.peak_memory``): the most that activations and temporaries held
together at any moment of the step, plus what the forward pass left for backward. Prints a markdown table and the
ratio of the slopes (bytes per extra sample) between exact and approximate training.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torchvision

import tritonact


def measure(model, batches, size, mode, bits):
    rows = []
    for n in batches:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, 3, size, size, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        if mode == "exact":
            tritonact.peak_memory(model, x, y)  # warm-up (allocator, lazy init)
            r = tritonact.peak_memory(model, x, y)
        else:
            with tritonact.approximate(model, bits=bits, ring=(mode == "ring")):
                tritonact.peak_memory(model, x, y)  # warm-up: ring buffers are allocated on first use
                r = tritonact.peak_memory(model, x, y)
        rows.append((n, r["activations_temporaries_peak"], r["activations_after_forward"], r["total"]))
        print(
            f"  {mode:>6} batch {n:>3}: act+temp peak {r['activations_temporaries_peak'] / 2**20:8.1f} MiB", flush=True
        )
    return rows


def slope(rows, col):
    (n0, *a), (n1, *b) = rows[0], rows[-1]
    return (b[col - 1] - a[col - 1]) / (n1 - n0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=10)
    results = {m: measure(model, args.batches, args.size, m, args.bits) for m in ("exact", "noring", "ring")}
    mib = 2**20
    print(
        f"\n{args.model}, {args.size}x{args.size}, fp32, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print(
        f"| batch | exact act+temp peak MiB | {args.bits}-bit, ring off | {args.bits}-bit, ring on | "
        f"exact / ring off | exact / ring on |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for (n, e, _, _), (_, a, _, _), (_, r, _, _) in zip(results["exact"], results["noring"], results["ring"]):
        print(f"| {n} | {e / mib:.1f} | {a / mib:.1f} | {r / mib:.1f} | {e / a:.2f}x | {e / r:.2f}x |")
    se, sa, sr = (slope(results[m], 1) for m in ("exact", "noring", "ring"))
    fe, fa = slope(results["exact"], 2), slope(results["noring"], 2)
    print(
        f"\nslope of the peak (MiB per extra sample): exact {se / mib:.2f}, ring off {sa / mib:.2f}, "
        f"ring on {sr / mib:.2f}; exact / approx = {se / sa:.1f}x (ring off), {se / sr:.1f}x (ring on)"
    )
    print(
        f"slope of what the forward leaves for backward: exact {fe / mib:.2f}, approx {fa / mib:.2f} MiB/sample "
        f"({fe / fa:.1f}x)"
    )


if __name__ == "__main__":
    main()
