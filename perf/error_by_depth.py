"""Conv weight gradient error by model and depth, per ``join_codes`` setting (docs/method.md section 3).

    python perf/error_by_depth.py [--models resnet18 resnet50 resnet152] [--bits 4] [--batch 8] [--res 64]
        [--seeds 0 1 2] [--settings 1 few auto 2] [--threads 2]

For each torchvision model at init (10 classes, one model and batch per seed), one approximate training step
against exact (``tritonact.fidelity``); the conv weight gradient relative L2 error, median over all convolutions
and per stage (conv1, layer1..layer4), and the max. Each setting runs two steps inside one ``approximate`` and
measures the second, so that ``"auto"``'s spread rule has seen a forward (it decides from the previous grid).
Rows: mean over seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torchvision

from tritonact import fidelity


def _twice(step):
    def run(*args):
        step(*args)
        return step(*args)

    return run


def errors(model, x, t, exact, bits, setting):
    """``GradErrors`` of the second of two steps inside one context (``join_codes=setting``)."""
    join_codes = int(setting) if setting.isdigit() else setting
    step = fidelity._step
    fidelity._step = _twice(step)
    try:
        return fidelity.grad_errors(model, x, t, bits=bits, exact=exact, join_codes=join_codes)
    finally:
        fidelity._step = step


def stage(name: str) -> str:
    return name.split(".")[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "resnet152"])
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["1", "few", "auto", "2"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    stages = ["conv1", "layer1", "layer2", "layer3", "layer4"]
    print(f"| model | bits | join_codes | median | max | {' | '.join(stages)} |")
    print("| --- " * (5 + len(stages)) + "|")
    for name in args.models:
        for bits in args.bits:
            rows = {s: [] for s in args.settings}
            for seed in args.seeds:
                torch.manual_seed(seed)
                model = getattr(torchvision.models, name)(num_classes=10)
                x = torch.randn(args.batch, 3, args.res, args.res)
                t = torch.randint(0, 10, (args.batch,))
                exact = fidelity.exact_run(model, x, t)
                for s in args.settings:
                    errs = errors(model, x, t, exact, bits, s)
                    per = {g: statistics.median([e for n, _, e in errs if stage(n) == g] or [math.nan]) for g in stages}
                    rows[s].append((statistics.median(errs.errors), max(errs.errors), per))
            for s, runs in rows.items():
                med = statistics.mean(r[0] for r in runs)
                mx = statistics.mean(r[1] for r in runs)
                per = " | ".join(f"{statistics.mean(r[2][g] for r in runs):.3f}" for g in stages)
                print(f"| {name} | {bits} | {s} | {med:.4f} | {mx:.4f} | {per} |", flush=True)


if __name__ == "__main__":
    main()
