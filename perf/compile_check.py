"""torch.compile(fullgraph=True) of an approximated torchvision model: graph breaks, loss against the exact model
(eager and compiled), conv weight gradients against the eager approximate path, first-step time, and (``--rounds``)
the step-time ratio approx / exact with both models compiled, interleaved, medians.

    python perf/compile_check.py --models resnet18,resnet50 --backends eager,inductor [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

import tritonact
from tritonact.fidelity import rel_l2


def check(name: str, backend: str, batch: int, size: int, bits: int, rounds: int = 0) -> dict:
    torch.manual_seed(0)
    base = torchvision.models.get_model(name, num_classes=10)
    x = torch.randn(batch, 3, size, size)

    def loss_of(m):
        torch.manual_seed(1)  # the same dropout / stochastic-depth draws in every run
        return m(x).square().mean()

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
    ratio = None
    if rounds:
        exact = copy.deepcopy(base)
        compiled_exact = torch.compile(exact, fullgraph=True, backend=backend)
        with tritonact.approximate(model, bits=bits):
            steps = [["exact", compiled_exact, exact], ["approx", compiled, model]]
            times = {"exact": [], "approx": []}
            for r in range(rounds + 2):  # two warm-up rounds
                for key, fn, m in steps:
                    t0 = time.perf_counter()
                    loss_of(fn).backward()
                    m.zero_grad(set_to_none=True)
                    if r >= 2:
                        times[key].append(time.perf_counter() - t0)
                steps.reverse()
        ratio = statistics.median(times["approx"]) / statistics.median(times["exact"])
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
        "step ratio approx/exact (both compiled)": ratio,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--backends", default="eager,inductor")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--rounds", type=int, default=0, help="timed rounds of the compiled step-time ratio (0: off)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = [check(m, b, a.batch, a.size, a.bits, a.rounds) for m in a.models.split(",") for b in a.backends.split(",")]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("| " + " | ".join("---" for _ in keys) + " |")
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
