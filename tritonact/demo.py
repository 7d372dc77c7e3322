"""``tritonact demo``: train one small ResNet in every mode from the same seed and compare.

Real data, no download: scikit-learn's handwritten digits (1,797 8x8 images, upsampled), or a local CIFAR-10 copy
in torchvision's format. Every mode starts from the same weights and sees the same batches in the same order; the
forward pass is exact in all but ``naive-4-bit``, so the modes differ only by the gradients.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tritonact
from tritonact.demo_report import format_table, machine_info, plot
from tritonact.memory import activation_bytes_per_sample, peak_memory

# mode -> keyword arguments of tritonact.approximate (None: plain PyTorch training)
MODES = {
    "exact": None,
    "8-bit": {"bits": 8},
    "4-bit": {"bits": 4},
    "2-bit": {"bits": 2},
    "naive-4-bit": {"bits": 4, "naive": True},
}
DATASETS = ("digits", "cifar10")
MIB = 2**20

# Sized for 2 CPU cores (one thread): the default run takes ~1.5 minutes (81 s measured), --quick under one.
DEFAULT_EPOCHS = 6
QUICK_EPOCHS = 2
DEFAULT_LR = 0.1


# ----------------------------------------------------------------------------------------------------------
# arguments


def _number(convert, ok, what):
    """An argparse ``type`` that converts with ``convert`` and accepts values for which ``ok`` holds."""

    def parse(s):
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        return v

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def _modes(s):
    modes = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(MODES)}, got {s!r}")
    if "exact" not in modes:
        modes.insert(0, "exact")  # the reference every ratio is taken against
    return [m for m in MODES if m in modes]


def _device(s):
    try:
        dev = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be 'cpu', 'cuda' or 'cuda:N', got {s!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be 'cpu', 'cuda' or 'cuda:N', got {s!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{s!r}: no CUDA GPU is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{s!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=Path("tritonact-demo"),
        metavar="DIR",
        help="where results.json and demo.png go (default: ./tritonact-demo)",
    )
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs instead of {DEFAULT_EPOCHS} (~1 min)")
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"training epochs per mode (default {DEFAULT_EPOCHS}, {QUICK_EPOCHS} with --quick)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="default 64")
    p.add_argument("--lr", type=_positive_float, default=DEFAULT_LR, help="peak learning rate (default 0.1)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="weights and batch order (default 0)")
    p.add_argument("--device", type=_device, default=torch.device("cpu"), help="cpu (default) or cuda")
    p.add_argument(
        "--data",
        choices=DATASETS,
        default="digits",
        help="digits (scikit-learn, default) or cifar10 (a local copy, see --data-dir)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="folder holding torchvision's cifar-10-batches-py (never downloaded)",
    )
    p.add_argument(
        "--modes",
        type=_modes,
        default=list(MODES),
        metavar="M1,M2",
        help=f"subset of {','.join(MODES)} (exact is always run)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help="torch CPU threads (default 1: this model's small convolutions gain little from more, and "
        "extra threads slow down badly when the cores are shared)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="CPU: run the compiled CPU path (TorchInductor; ~1 min of compilation per bit width on 2 "
        "cores, more than this tiny model's training saves); default: the eager torch path",
    )
    p.add_argument(
        "--train-samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train on the first N training samples only (default: all)",
    )


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.data == "cifar10" and args.data_dir is None:
        p.error("--data cifar10 needs --data-dir PATH (a local torchvision CIFAR-10 copy; nothing is downloaded)")
    if args.data == "digits" and args.data_dir is not None:
        p.error(f"--data-dir {args.data_dir} is only used with --data cifar10")
    if args.data_dir is not None and not args.data_dir.is_dir():
        p.error(f"--data-dir {args.data_dir}: no such directory")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out}: exists and is not a directory")
    try:  # before training, not after it: a folder that cannot be written would lose the results
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".tritonact-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        p.error(f"--out {args.out}: cannot write there ({e.strerror or e})")
    if args.quick and args.epochs is not None:
        p.error(f"--quick sets the epochs; drop it or --epochs {args.epochs}")


# ----------------------------------------------------------------------------------------------------------
# data and model


def _need(*modules: str) -> None:
    missing = []
    for m in modules:
        try:
            __import__(m)
        except ImportError:
            missing.append(m)
    if missing:
        raise SystemExit(f"tritonact demo needs {', '.join(missing)}: pip install 'tritonact[test]'")


def load_data(name: str, data_dir: Path | None = None):
    """``(x_train, y_train, x_test, y_test)`` as normalized float tensors ``(N, C, H, W)`` and int64 labels."""
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        # 8x8 -> 16x16 gives the three stages 16, 8 and 4 pixels; the split is fixed whatever the seed
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        y = torch.tensor(d.target, dtype=torch.int64)
        tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=0, stratify=d.target)
        tr, te = torch.from_numpy(tr), torch.from_numpy(te)
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    elif name == "cifar10":
        from torchvision.datasets import CIFAR10

        try:
            train = CIFAR10(str(data_dir), train=True, download=False)
            test = CIFAR10(str(data_dir), train=False, download=False)
        except RuntimeError as e:
            raise SystemExit(
                f"--data-dir {data_dir}: no CIFAR-10 found ({e}); expected {data_dir}/cifar-10-batches-py as "
                "torchvision writes it (nothing is downloaded)"
            ) from None
        x_tr = torch.from_numpy(train.data).permute(0, 3, 1, 2).float() / 255.0
        x_te = torch.from_numpy(test.data).permute(0, 3, 1, 2).float() / 255.0
        y_tr, y_te = torch.tensor(train.targets), torch.tensor(test.targets)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    dims = (0, 2, 3)
    mean, std = x_tr.mean(dims, keepdim=True), x_tr.std(dims, keepdim=True)
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def small_resnet(in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64)) -> nn.Sequential:
    """A 3-stage ResNet of torchvision ``BasicBlock``s (conv-BN-ReLU-conv-BN + residual add, ReLU)."""
    from torchvision.models.resnet import BasicBlock

    layers = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    cin = widths[0]
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or cin != w:
            down = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
        layers.append(BasicBlock(cin, w, stride, down))
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------------
# one mode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _accuracy(model, x, y, batch: int = 512) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


def run_mode(mode: str, data, args, bar) -> dict:
    dev = args.device
    x_tr, y_tr, x_te, y_te = (t.to(dev) for t in data)
    torch.manual_seed(args.seed)
    model = small_resnet(x_tr.shape[1], 10).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    n = len(y_tr)
    steps_per_epoch = math.ceil(n / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(args.seed)  # same batches in every mode
    kw = MODES[mode]
    ctx = contextlib.nullcontext() if kw is None else tritonact.approximate(model, compile=args.compile, **kw)
    compiling = kw is not None and args.compile and dev.type == "cpu"

    losses, times = [], []
    bar.set_description(f"{mode:>11}" + (" (compiling)" if compiling else ""))
    t0 = time.perf_counter()
    with ctx:
        model.train()
        for _ in range(args.epochs):
            perm = torch.randperm(n, generator=order).to(dev)
            for i in range(0, n, args.batch_size):
                idx = perm[i : i + args.batch_size]
                xb, yb = x_tr[idx], y_tr[idx]
                _sync(dev)
                t = time.perf_counter()
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                _sync(dev)
                times.append(time.perf_counter() - t)
                if compiling and len(times) == 1:
                    bar.set_description(f"{mode:>11}")
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        train_s = time.perf_counter() - t0
        accuracy = _accuracy(model, x_te, y_te)
        # memory of the trained model in this mode (after the accuracy: the measured step moves the weights)
        xb, yb = x_tr[: args.batch_size].clone(), y_tr[: args.batch_size].clone()  # own storage: "other" = batch
        # at the training batch size (between half of it and it): the codes a join keeps depend on the values per
        # channel (ApproxConfig.join_codes), so a tiny batch's bytes are not training's
        half = max(1, args.batch_size // 2)
        per_sample = activation_bytes_per_sample(
            model, lambda k: x_tr[torch.arange(k, device=dev) % n], batch_sizes=(half, max(args.batch_size, half + 1))
        )
        peak = peak_memory(model, xb, yb, optimizer=opt)

    warm = max(1, len(times) // 10)  # first steps pay for allocation and caches
    steady = times[warm:] or times
    last = losses[-steps_per_epoch:]
    return {
        "mode": mode,
        "bits": None if kw is None else kw["bits"],
        "naive": bool(kw and kw.get("naive", False)),
        "test_accuracy": accuracy,
        "final_loss": sum(last) / len(last),
        "activation_mib_per_sample": per_sample / MIB,
        "peak_mib": peak["total"] / MIB,
        "peak_breakdown_mib": {k: v / MIB for k, v in peak.items() if isinstance(v, int)},
        "peak_method": peak["method"],
        "step_time_s": statistics.median(steady),
        "train_time_s": train_s,
        "steps": len(times),
        "losses": losses,
    }


# ----------------------------------------------------------------------------------------------------------
# output


def run(args: argparse.Namespace) -> int:
    """The ``tritonact demo`` command: arguments already parsed and checked."""
    _need("sklearn", "torchvision", "matplotlib")
    from tqdm.auto import tqdm

    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS
    threads = torch.get_num_threads()
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return _run(args, tqdm)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, tqdm) -> int:
    t0 = time.perf_counter()
    data = load_data(args.data, args.data_dir)
    if args.train_samples is not None:
        data = (data[0][: args.train_samples], data[1][: args.train_samples], data[2], data[3])
    n_train = len(data[1])
    steps = args.epochs * math.ceil(n_train / args.batch_size)
    print(
        f"tritonact demo: small ResNet on {args.data} ({n_train} train / {len(data[3])} test, "
        f"{tuple(data[0].shape[1:])}), {args.epochs} epochs x {math.ceil(n_train / args.batch_size)} steps, "
        f"batch {args.batch_size}, seed {args.seed}, {args.device}, {torch.get_num_threads()} threads",
        flush=True,
    )
    runs = []
    with tqdm(total=steps * len(args.modes), unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
        for mode in args.modes:
            runs.append(run_mode(mode, data, args, bar))
    exact = runs[0]
    for r in runs:
        r["step_time_ratio"] = r["step_time_s"] / exact["step_time_s"]
        r["accuracy_delta_points"] = 100 * (r["test_accuracy"] - exact["test_accuracy"])
        r["activation_ratio"] = exact["activation_mib_per_sample"] / max(r["activation_mib_per_sample"], 1e-12)

    elapsed = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "runs": runs,
        "settings": {
            "data": args.data,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "train_samples": n_train,
            "test_samples": len(data[3]),
            "input_shape": list(data[0].shape[1:]),
            "model": "ResNet, BasicBlock stages 16/32/64",
            "threads": torch.get_num_threads(),
            "compile": args.compile,
        },
        "machine": machine_info(args.device),
        "elapsed_s": elapsed,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(runs, args.out / "demo.png")

    print(format_table(runs))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'demo.png'} ({elapsed:.0f} s)")
    return 0
