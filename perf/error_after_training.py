"""Gradient error of the demo model at init and after training: does the approximation stay as good as the
weights move away from their initial values?

The demo model (``tritonact.demo.small_resnet``) trains on digits with the demo's optimizer and schedule (SGD,
Nesterov momentum, OneCycle to lr 0.1, batch 64), exactly or at 4 bits. At steps 0, 50, 100 and 200 the conv weight
gradient error of one approximate step against exact, from those weights, on fixed batches of 8 and 64 training
samples (``tritonact.fidelity.grad_errors``), is printed as median / max over the model's convolutions:

    python perf/error_after_training.py            # about 2 minutes on a 2-core CPU
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


def _errors(model, x, y, bits):
    res = grad_errors(model, x, y, bits=bits, forward_rtol=1e-5, compile=False)
    e = res.errors
    return statistics.median(e), max(e)


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
    print("weights trained | step | " + " | ".join(f"{b}-bit, {n} samples" for b in a.bits for n in batches))
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
                for bits in a.bits:
                    for x, y in batches.values():
                        cells.append("{:.3f} / {:.3f}".format(*_errors(snap, x, y, bits)))
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
