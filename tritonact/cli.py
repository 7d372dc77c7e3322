"""The ``tritonact`` command: ``demo``, ``bench`` and ``autotune``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import tritonact

PERF_DIR = Path(__file__).resolve().parent.parent / "perf"


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(
        prog="tritonact",
        description="Exact forward, k-bit activations for backward: see it train, benchmark it, tune it.",
    )
    p.add_argument("--version", action="version", version=f"tritonact {tritonact.__version__}")
    sub = p.add_subparsers(dest="verb", metavar="{demo,bench,autotune}")
    sub.required = True

    from tritonact import demo

    d = sub.add_parser(
        "demo",
        help="train a small ResNet on real digits in every mode and compare (~1.5 min on 2 CPU cores)",
        description="Trains one small ResNet (torchvision BasicBlocks) on scikit-learn's digits from "
        "the same seed in each mode (exact, 8-bit, 4-bit, 2-bit, naive-4-bit); prints a "
        "table and writes results.json and demo.png to --out.",
    )
    demo.add_arguments(d)

    sub.add_parser(
        "bench",
        help="run the perf suite (pytest perf --benchmark-enable); extra options go to pytest",
        description="Runs `pytest perf --benchmark-enable` plus any options given after `bench`, e.g. "
        "`tritonact bench -k quantize --benchmark-autosave`, and exits with pytest's code.",
        add_help=False,  # so that `tritonact bench --help` reaches pytest too
    )

    a = sub.add_parser(
        "autotune",
        help="on a GPU: benchmark every kernel's candidate configs, store the winners",
        description="Benchmarks the candidate launch configs of the Triton kernels over representative "
        "shapes and writes the winners to the per-GPU config file the kernels read at "
        "first launch ($TRITONACT_CONFIG_DIR, default ~/.cache/tritonact).",
    )
    a.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the JSON here instead of the per-GPU file in the config directory",
    )
    a.add_argument("--kernels", default=None, metavar="K1,K2", help="tune only these kernels (default: all)")
    a.add_argument("--quick", action="store_true", help="fewer shapes and shorter timings")
    return p, {"demo": d, "autotune": a}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p, verbs = _parser()
    # `bench` hands everything after it to pytest untouched (argparse would reject pytest's options)
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    args = p.parse_args(argv)
    if args.verb == "demo":
        from tritonact import demo

        demo.check_arguments(verbs["demo"], args)
        return demo.run(args)
    if args.verb == "autotune":
        from tritonact import autotune

        return autotune.run(args, verbs["autotune"])
    p.error(f"unknown verb {args.verb!r}")  # unreachable: argparse checks the choice
    return 2


def bench(pytest_args: list[str]) -> int:
    """``pytest perf --benchmark-enable <pytest_args>``; pytest prints its benchmark table. Returns its exit code."""
    try:
        import pytest  # noqa: F401
        import pytest_benchmark  # noqa: F401
    except ImportError:
        print("tritonact bench needs pytest and pytest-benchmark: pip install 'tritonact[test]'", file=sys.stderr)
        return 2
    if not PERF_DIR.is_dir():
        print(
            f"tritonact bench: no perf suite at {PERF_DIR} (it ships with the source checkout, not the wheel)",
            file=sys.stderr,
        )
        return 2
    # a child process, in the checkout root, so that pyproject's pytest settings and perf/conftest.py apply
    cmd = [sys.executable, "-m", "pytest", "perf", "--benchmark-enable", *pytest_args]
    return subprocess.call(cmd, cwd=PERF_DIR.parent)


if __name__ == "__main__":
    sys.exit(main())
