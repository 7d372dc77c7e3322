"""torch.compile(fullgraph=True) of an approximated torchvision model: graph breaks, loss against the exact model
(eager and compiled), conv weight gradients against the eager approximate path.

    python perf/compile_check.py --models resnet18,resnet50 --backends eager,inductor
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision

import tritonact
from tritonact.fidelity import rel_l2


def check(name: str, backend: str, batch: int, size: int, bits: int) -> dict:
    torch.manual_seed(0)
    base = torchvision.models.get_model(name, num_classes=10)
    x = torch.randn(batch, 3, size, size)
    loss_of = lambda m: m(x).square().mean()  # noqa: E731
    eager = copy.deepcopy(base)
    with tritonact.approximate(eager, bits=bits):
        loss_eager = loss_of(eager)
        loss_eager.backward()
    loss_exact = loss_of(copy.deepcopy(base))
    torch._dynamo.reset()
    loss_exact_compiled = loss_of(torch.compile(copy.deepcopy(base), fullgraph=True, backend=backend))
    probe = copy.deepcopy(base)
    with tritonact.approximate(probe, bits=bits):
        explain = torch._dynamo.explain(probe)(x)
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    with tritonact.approximate(model, bits=bits):
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        t0 = time.perf_counter()
        loss = loss_of(compiled)
        loss.backward()
        first = time.perf_counter() - t0
    errs = [rel_l2(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters()) if p.dim() == 4]
    return {
        "model": name,
        "backend": backend,
        "graphs": explain.graph_count,
        "breaks": explain.graph_break_count,
        "loss == eager exact": bool(torch.equal(loss, loss_exact)),
        "loss == compiled exact": bool(torch.equal(loss, loss_exact_compiled)),
        "|loss - compiled exact|": abs(loss.item() - loss_exact_compiled.item()),
        "max conv grad rel vs eager approx": max(errs),
        "first step s": round(first, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--backends", default="eager,inductor")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bits", type=int, default=4)
    a = p.parse_args()
    rows = [check(m, b, a.batch, a.size, a.bits) for m in a.models.split(",") for b in a.backends.split(",")]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("| " + " | ".join("---" for _ in keys) + " |")
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
