"""Seconds from a fresh process to its first approximate training step done (import included), the wait a new user
meets. Run it twice with the same TORCHINDUCTOR_CACHE_DIR for a cold and a warm cache:

    export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
    python perf/first_step.py --model resnet50 --bits 4   # cold: compiles the CPU path's graphs
    python perf/first_step.py --model resnet50 --bits 4   # warm: the C++ comes from the cache
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402

import tritonact  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.get_model(a.model, num_classes=10)
    x, y = torch.randn(a.batch, 3, a.size, a.size), torch.randint(0, 10, (a.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    t_import = time.perf_counter() - T0
    with tritonact.approximate(model, bits=a.bits):
        t1 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        t_step = time.perf_counter() - t1
        t2 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        t_second = time.perf_counter() - t2
    total = time.perf_counter() - T0
    print(
        f"{a.model} {a.bits}-bit {a.batch}x{a.size}px: first step done {total:.1f} s after start "
        f"(imports and model {t_import:.1f} s, first step {t_step:.1f} s, second step {t_second:.2f} s)"
    )


if __name__ == "__main__":
    main()
