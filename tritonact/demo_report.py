"""The demo's outputs: the machine it ran on, the results table and the figure."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

import tritonact

MIB = 2**20


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tritonact": tritonact.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def format_table(runs: list[dict]) -> str:
    head = (
        f"{'mode':<12} {'test acc %':>10} {'final loss':>10} {'act MiB/sample':>14} {'peak MiB':>9} "
        f"{'step s':>8} {'x exact':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r['mode']:<12} {100 * r['test_accuracy']:>10.2f} {r['final_loss']:>10.4f} "
            f"{r['activation_mib_per_sample']:>14.4f} {r['peak_mib']:>9.2f} {r['step_time_s']:>8.4f} "
            f"{r['step_time_ratio']:>7.2f}"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in runs:
        loss = torch.tensor(r["losses"])
        k = max(1, min(10, len(loss) // 10))  # moving average over k steps
        smooth = loss.unfold(0, k, 1).mean(1) if len(loss) >= k else loss
        ax1.plot(range(k, k + len(smooth)), smooth.tolist(), label=r["mode"], lw=1.5)
    ax1.set_yscale("log")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("training loss (moving average)")
    ax1.set_title("Loss per mode, same seed and batches")
    ax1.legend()
    names = [r["mode"] for r in runs]
    vals = [1024 * r["activation_mib_per_sample"] for r in runs]
    bars = ax2.bar(names, vals, color=[f"C{i}" for i in range(len(runs))])
    ref = vals[0] or 1.0
    for b, v in zip(bars, vals):
        ax2.annotate(
            f"{v:.1f} KiB\n{ref / v:.1f}x less" if v and v != ref else f"{v:.1f} KiB",
            (b.get_x() + b.get_width() / 2, v),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax2.set_ylabel("activation memory per sample (KiB)")
    ax2.set_title("Saved for backward, per sample")
    ax2.set_ylim(0, max(vals) * 1.25 if max(vals) > 0 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
