"""What tritonact keeps per sample on the CNN families people train, and the gradient error it costs (docs/coverage.md).

    python perf/coverage_table.py [--models efficientnet_b0 convnext_tiny ...] [--bits 4]

Per model (torchvision, random init, 10 classes): bytes autograd keeps per sample (slope between batches 8 and 16,
``tritonact.activation_bytes_per_sample``; at batches 2 and 4 the last units of small models see too few values per
channel and run exactly, which overstates the saving) exact, with units only (``generic=False``) and with the
generic path (the default), and the median / max conv weight gradient error of one step against exact (8 samples,
``tritonact.fidelity.grad_errors``) at 8 bits and at ``--bits``. 64x64 inputs (inception_v3: 96x96, resnet50:
128x128). The forward is checked bit for bit on every run (output and loss equal to exact). Models from timm
(``timm/<name>``) run where timm is installed.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torchvision

import tritonact
from tritonact import fidelity

DEFAULT = [
    "resnet50",
    "efficientnet_b0",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "regnet_y_400mf",
    "googlenet",
    "inception_v3",
    "convnext_tiny",
    "squeezenet1_1",
    "timm/resnet50d",
    "timm/seresnext26d_32x4d",
    "timm/efficientnet_b0",
    "timm/mobilenetv3_large_100",
    "timm/regnety_008",
    "timm/cspresnet50",
    "timm/densenet121",
    "timm/dpn68",
    "timm/resnetv2_50",
    "timm/rexnet_100",
    "timm/ghostnet_100",
    "timm/res2net50_26w_4s",
    "timm/dla34",
]
BATCHES = (8, 16)
SIZE = {"inception_v3": 96, "resnet50": 128}


def build(name: str):
    torch.manual_seed(0)
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name[5:], num_classes=10, pretrained=False)
    kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, num_classes=10, **kw)


def row(name: str, bits: int) -> dict:
    model = build(name)
    size = SIZE.get(name, 64)

    def make(n):
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))

    out = {"model": name, "size": size}
    exact = tritonact.activation_bytes_per_sample(model, make, BATCHES)
    out["exact"] = exact
    for generic in (False, True):
        with tritonact.approximate(model, bits=bits, generic=generic) as ctx:
            got = tritonact.activation_bytes_per_sample(model, make, BATCHES)
        out["units" if not generic else "generic"] = got
    out["units_n"] = len(ctx.report().units)
    x = make(8)
    t = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    ex = fidelity.exact_run(model, x, t)
    for b in (8, bits):
        e = sorted(err for _, _, err in fidelity.grad_errors(model, x, t, bits=b, exact=ex, forward_rtol=0.0))
        out[f"err{b}"] = (e[len(e) // 2], e[-1])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT)
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args(argv)
    rows = []
    for i, name in enumerate(args.models):
        t0 = time.perf_counter()
        try:
            r = row(name, args.bits)
        except ImportError as e:
            print(f"[{i + 1}/{len(args.models)}] {name}: skipped ({e})", flush=True)
            continue
        rows.append(r)
        print(f"[{i + 1}/{len(args.models)}] {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    b = args.bits
    print(f"\n{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32\n")
    print(
        f"| model | input | units | exact KiB/sample | {b}-bit units only | {b}-bit with the generic path | "
        f"8-bit conv error median / max | {b}-bit median / max |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        e8, eb = r["err8"], r[f"err{b}"]
        print(
            f"| {r['model']} | {r['size']}x{r['size']} | {r['units_n']} | {r['exact'] / 1024:.0f} | "
            f"{r['exact'] / r['units']:.2f}x | {r['exact'] / r['generic']:.2f}x | {e8[0]:.3f} / {e8[1]:.3f} | "
            f"{eb[0]:.3f} / {eb[1]:.3f} |"
        )


if __name__ == "__main__":
    main()
