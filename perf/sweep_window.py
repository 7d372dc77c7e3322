"""Sweep the quantizer's window and positive fraction per bit width (the measurement behind docs/method.md).

    .venv/bin/python perf/sweep_window.py [--seeds 0 1 2] [--bits 8 4 2] [--res 64] [--json out.json]
        [--models resnet18 resnet50] [--windows 4 3.5 3] [--pfs 0.75] [--decode auto|centroid|midpoint]

For torchvision resnet18 and resnet50 at init (10 classes, 8 samples of 64x64 or ``--res``, one model and batch per
seed), reports the conv weight gradient relative L2 error (median over convs, and max) of every setting against exact.
Table cells: mean over seeds of the median / max over seeds and convs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time

import torch
import torchvision

from tritonact.fidelity import exact_run, grad_errors, summarize

WINDOWS = (math.inf, 6.0, 5.0, 4.0, 3.5, 3.0, 2.5, 2.0)
GRID = {
    8: (WINDOWS[:4], (0.625, 0.75, 0.875)),
    4: (WINDOWS, (0.625, 0.75, 0.875, 0.9375)),
    2: (WINDOWS, (0.5, 0.75)),  # 2 bits: 4 levels, so only 2/2 and 1/3 negative/positive splits exist
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--res", type=int, default=64, help="input height and width")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=float, nargs="+", default=None, help="only these windows (default: the grid's)")
    ap.add_argument("--pfs", type=float, nargs="+", default=None, help="only these positive fractions")
    ap.add_argument("--decode", default="auto", choices=("auto", "centroid", "midpoint"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    t0 = time.time()
    for arch, seed in itertools.product(args.models, args.seeds):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, arch)(num_classes=10)
        x, t = torch.randn(8, 3, args.res, args.res), torch.randint(0, 10, (8,))
        ex = exact_run(model, x, t)
        for bits in args.bits:
            windows, pfs = GRID[bits]
            windows, pfs = args.windows or windows, args.pfs or pfs
            for w, pf in itertools.product(windows, pfs):
                r = grad_errors(
                    model, x, t, bits=bits, exact=ex, window=w, positive_fraction=pf, decode=args.decode,
                    forward_rtol=1e-5,
                )  # fmt: skip
                s = summarize(r)
                rows.append(dict(model=arch, seed=seed, bits=bits, window=w, pf=pf, median=s.median, max=s.max))
                print(f"{time.time() - t0:7.1f}s {arch} seed {seed} {bits}b W={w} pf={pf}: {s}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    print_table(rows)


def print_table(rows) -> None:
    print("| bits | window | pos. fraction | resnet18 median | resnet18 max | resnet50 median | resnet50 max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    keys = sorted({(r["bits"], r["window"], r["pf"]) for r in rows}, key=lambda k: (-k[0], -k[1], k[2]))
    for bits, w, pf in keys:
        cells = []
        for arch in ("resnet18", "resnet50"):
            sel = [r for r in rows if (r["bits"], r["window"], r["pf"], r["model"]) == (bits, w, pf, arch)]
            if not sel:
                cells += ["", ""]
                continue
            cells.append(f"{statistics.mean(r['median'] for r in sel):.4f}")
            cells.append(f"{max(r['max'] for r in sel):.4f}")
        print(f"| {bits} | {w:g} | {pf:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
