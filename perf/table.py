"""Markdown tables from a saved pytest-benchmark run (``--benchmark-json=FILE`` or a file under perf/baselines/).

    python perf/table.py FILE.json

Prints the machine line, then one table each for kernels, training steps, the interleaved step-time ratio and the
max batch (GPU), from the numbers the benchmarks put in ``extra_info``. docs/benchmarks.md's results come from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _med_ms(b) -> float:
    return b["stats"]["median"] * 1e3


def render(data: dict) -> str:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    lines = [
        f"Machine: {mi.get('gpu') or cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores, "
        f"{mi.get('cpu_threads', '?')} torch thread(s); torch {mi.get('torch')}, triton {mi.get('triton')}, "
        f"tritonact {mi.get('tritonact')}; {data.get('datetime', '')[:19]}",
        "",
    ]
    benches = data.get("benchmarks", [])
    kern = [b for b in benches if b["name"].startswith("test_kernel")]
    if kern:
        lines += [
            "| kernel | bits | shape | dtype | median ms | GB/s | peak MiB |",
            "|---|---:|---|---|---:|---:|---:|",
        ]
        for b in kern:
            e = b["extra_info"]
            per_call = _med_ms(b) / e.get("calls_per_round", 1)
            lines.append(
                f"| {e['kernel']} | {e['bits']} | {'x'.join(map(str, e['shape']))} | "
                f"{e['dtype'].replace('torch.', '')} | {per_call:.3f} | {e.get('GB/s', float('nan')):.3f} | "
                f"{e.get('peak_mib', float('nan')):.1f} |"
            )
        lines.append("")
    train = [b for b in benches if b["name"].startswith("test_train_step")]
    if train:
        exact = {b["extra_info"]["arch"]: b for b in train if b["extra_info"]["mode"] == "exact"}
        lines += [
            "| model | batch | mode | step ms (median) | x exact | activations MiB/sample | x less | "
            "peak MiB | held after forward MiB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for b in train:
            e = b["extra_info"]
            ex = exact.get(e["arch"])
            rt = _med_ms(b) / _med_ms(ex) if ex else float("nan")
            less = ex["extra_info"]["act_mib_per_sample"] / e["act_mib_per_sample"] if ex else float("nan")
            lines.append(
                f"| {e['arch']} | {e['batch']}x{e['res']}px | {e['mode']} | {_med_ms(b):.0f} | {rt:.2f} | "
                f"{e['act_mib_per_sample']:.3f} | {less:.1f} | {e['peak_mib']:.0f} | "
                f"{e['activations_after_forward_mib']:.1f} |"
            )
        lines.append("")
    ratio = [b for b in benches if b["name"].startswith("test_step_time_ratio")]
    if ratio:
        lines += ["| model | batch | exact s (median) | 4-bit s (median) | 4-bit / exact |", "|---|---|---:|---:|---:|"]
        for b in ratio:
            e = b["extra_info"]
            lines.append(
                f"| {e['arch']} | {e['batch']}x{e['res']}px | {e['exact_median_s']:.3f} | "
                f"{e['approx_median_s']:.3f} | {e['ratio']:.2f} |"
            )
        lines.append("")
    maxb = [b for b in benches if b["name"].startswith("test_max_batch")]
    if maxb:
        lines += ["| model | budget | max batch exact | max batch 4-bit | ratio |", "|---|---:|---:|---:|---:|"]
        for b in maxb:
            e = b["extra_info"]
            lines.append(
                f"| {e['arch']} {e['res']}px | {e['budget_mib']} MiB | {e.get('max_batch_exact')} | "
                f"{e.get('max_batch_4bit')} | {e.get('ratio', float('nan')):.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    print(render(json.loads(ap.parse_args(argv).file.read_text())))


if __name__ == "__main__":
    main()
