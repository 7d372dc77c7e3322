"""Launch configurations: built-in rules, overridden by the per-GPU winners of ``tritonact autotune``.

Tuned configs live in one JSON file per (GPU name, Triton version) under ``TRITONACT_CONFIG_DIR`` (default
``~/.cache/tritonact``). A file is read once, at a kernel's first launch; a missing or unreadable file falls back
to the rules below. Under the Triton interpreter every kernel gets a single fixed config.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def config_dir() -> Path:
    return Path(os.environ.get("TRITONACT_CONFIG_DIR", Path.home() / ".cache" / "tritonact"))


def config_path(device_name: str | None = None) -> Path:
    import triton

    if device_name is None:
        device_name = torch.cuda.get_device_name()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    return config_dir() / f"{slug}-triton{triton.__version__}.json"


@cache
def _tuned() -> dict:
    if interpreting() or not torch.cuda.is_available():
        return {}
    try:
        return json.loads(config_path().read_text())["configs"]
    except (OSError, ValueError, KeyError):
        return {}


def reload_tuned() -> None:
    """Forget the cached tuned configs (after ``tritonact autotune`` wrote new ones)."""
    _tuned.cache_clear()


def size_bucket(n: int) -> int:
    """Power-of-two bucket of a size, so tuned entries generalise across nearby shapes."""
    return 1 << max(int(n) - 1, 0).bit_length()


def tuning_key(kernel: str, **key) -> str:
    return kernel + "|" + ",".join(f"{k}={v}" for k, v in sorted(key.items()))


def candidates(kernel: str) -> list[dict]:
    """Configs ``tritonact autotune`` tries for ``kernel`` (a single one under the interpreter)."""
    if interpreting():
        # the interpreter's cost is per op, not per element: the bn_act kernels (many ops) take bigger blocks
        return [{"BLOCK": 1024 if kernel.startswith("bn_") else 256, "num_warps": 4}]
    if kernel in ("quantize", "dequantize"):
        return [{"BLOCK": b, "num_warps": w} for b in (256, 512, 1024, 2048) for w in (4, 8)]
    if kernel in ("bn_stats", "bn_fwd", "bn_bwd_reduce", "bn_bwd", "bn_decode"):
        return [{"BLOCK": b, "num_warps": w} for b in (512, 1024, 2048, 4096) for w in (4, 8)]
    raise KeyError(f"unknown kernel {kernel!r}")


def default_config(kernel: str, **key) -> dict:
    if interpreting():
        return candidates(kernel)[0]
    if kernel in ("quantize", "dequantize"):
        # ~4096 elements per program: 16 KiB of fp32 in flight, enough to saturate HBM with few programs.
        per = 8 // key.get("bits", 8)
        return {"BLOCK": max(256, 4096 // per), "num_warps": 8}
    return {"BLOCK": 2048, "num_warps": 8}


def bucketed(**key) -> dict:
    """``key`` with its size dims (``numel``, ``spatial``) rounded up to their power-of-two bucket."""
    return {k: (size_bucket(v) if k in ("numel", "spatial") else v) for k, v in key.items()}


_FORCED: dict[str, dict] = {}


@contextmanager
def forced_config(kernel: str, config: dict):
    """Launch ``kernel`` with ``config`` inside the block (``tritonact autotune`` times candidates this way)."""
    _FORCED[kernel] = dict(config)
    try:
        yield
    finally:
        _FORCED.pop(kernel, None)


def launch_config(kernel: str, **key) -> dict:
    """The config to launch ``kernel`` with. ``key`` holds the dims that change the best choice (never batch)."""
    if kernel in _FORCED:
        return dict(_FORCED[kernel])
    tuned = _tuned().get(tuning_key(kernel, **bucketed(**key)))
    return dict(tuned) if tuned else default_config(kernel, **key)
