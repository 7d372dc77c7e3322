"""Gradient error of the demo model at init and after training: does the approximation stay as good as the
weights move away from their initial values?

The demo model (``tritonact.demo.small_resnet``) trains on digits with the demo's optimizer and schedule (SGD,
Nesterov momentum, OneCycle to lr 0.1, batch 64), exactly or at 4 bits. At steps 0, 50, 100 and 200 the conv weight
gradient error of one approximate step against exact, from those weights, on fixed batches of 8 and 64 training
samples (``tritonact.fidelity.grad_errors``), is printed as median / max over the model's convolutions, and
after ``|`` the median of the same errors scaled to the per-sample gradients:

    python perf/error_after_training.py            # about 3 minutes on a 2-core CPU

Why the second figure. The batch gradient is the sum of the samples' gradients ``g_i``; its relative error is the
approximation's error over ``|sum g_i|``. As the model fits its training data, the ``g_i`` stop pointing the same
way (``R = |sum g_i| / sqrt(sum |g_i|^2)``, from ``sqrt(n)`` for identical gradients to ~1 for unrelated ones, falls
from 1.2-1.6 at init to ~1.0 after 200 steps here), so the same error per sample is a larger share of their sum.
``error * R = |error| / sqrt(sum |g_i|^2)`` (per conv, exact per-sample gradients of one batch forward) does not
move with that cancellation: it is the error on the scale of the samples' own gradients.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F

from tritonact import approximate
from tritonact.demo import load_data, small_resnet
from tritonact.fidelity import grad_errors

CHECKPOINTS = (0, 50, 100, 200)


def _errors(model, x, y, bits, coherence):
    res = grad_errors(model, x, y, bits=bits, forward_rtol=1e-5, compile=False)
    e = res.errors
    return statistics.median(e), max(e), statistics.median(a * r for a, r in zip(e, coherence))


def coherence(model, x, y) -> list[float]:
    """``R`` of every conv weight gradient (forward execution order, as ``grad_errors``): ``|sum g_i| /
    sqrt(sum |g_i|^2)`` over the samples' exact gradients in one training-mode forward of the batch."""
    m = copy.deepcopy(model).train()
    convs = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: convs.append(mod.weight))
             for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]  # fmt: skip
    losses = F.cross_entropy(m(x), y, reduction="none")
    for h in hooks:
        h.remove()
    per = [torch.autograd.grad(loss, convs, retain_graph=True) for loss in losses]
    out = []
    for k in range(len(convs)):
        G = torch.stack([g[k].flatten() for g in per])
        out.append((G.sum(0).norm() / G.norm()).item())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    x_tr, y_tr, _, _ = load_data("digits")
    g = torch.Generator().manual_seed(1234)
    probe = torch.randperm(len(y_tr), generator=g)[:64]
    batches = {8: (x_tr[probe[:8]], y_tr[probe[:8]]), 64: (x_tr[probe], y_tr[probe])}
    print("weights trained | step | " + " | ".join(f"{b}-bit, {n} samples" for b in a.bits for n in batches)
          + " | " + " | ".join(f"R, {n} samples" for n in batches))  # fmt: skip
    for trained in ("exact", "4-bit"):
        torch.manual_seed(a.seed)
        model = small_resnet(1, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=CHECKPOINTS[-1])
        order = torch.Generator().manual_seed(a.seed)
        step = 0
        while True:
            if step in CHECKPOINTS:
                snap = copy.deepcopy(model)
                cells = []
                R = {n: coherence(snap, x, y) for n, (x, y) in batches.items()}
                for bits in a.bits:
                    for n, (x, y) in batches.items():
                        cells.append("{:.3f} / {:.3f} \\| {:.3f}".format(*_errors(snap, x, y, bits, R[n])))
                cells += [f"{statistics.median(r):.2f}" for r in R.values()]
                print(f"| {trained} | {step} | " + " | ".join(cells) + " |", flush=True)
            if step == CHECKPOINTS[-1]:
                break
            idx = torch.randint(0, len(y_tr), (64,), generator=order)
            if trained == "exact":
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
            else:
                with approximate(model, bits=4, compile=False):
                    loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
            opt.step()
            sched.step()
            step += 1


if __name__ == "__main__":
    main()
