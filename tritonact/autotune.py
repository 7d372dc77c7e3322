"""``tritonact autotune``: time every candidate launch config of each Triton kernel on this GPU, keep the winners.

The winners go to ``kernels._config.config_path()`` (one JSON file per GPU name and Triton version under
``TRITONACT_CONFIG_DIR``) as ``{"device": ..., "triton": ..., "configs": {tuning_key: config}}``; the kernels read
it at their first launch through ``launch_config``, with the same keys (``tuning_key(kernel, **bucketed(**key))``).

To make a kernel tunable, add a :class:`Tunable` to :data:`REGISTRY` (see "REGISTRY" below): its name in
``kernels/_config.py`` (``candidates`` / ``launch_config``), the representative problems, the launch-config key
of a problem, and a function that builds a zero-argument callable launching the kernel once with a given config.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Tunable:
    """One kernel that ``tritonact autotune`` tunes.

    Args:
        kernel: its name in ``kernels/_config.py`` (``candidates(kernel)``, ``launch_config(kernel, **key)``).
        problems: ``problems(quick) -> list[dict]``: representative problems (shapes, bits, ...), fewer if quick.
        key: ``key(problem) -> dict``: the keyword arguments the launcher passes to ``launch_config`` for this
            problem (unbucketed; the tuner buckets them the way ``launch_config`` does).
        build: ``build(config, problem, device) -> fn``: allocates inputs and outputs once, returns a callable that
            launches the kernel once with ``config`` (``BLOCK``, ``num_warps``, ...). Nothing is allocated in ``fn``.
    """

    kernel: str
    problems: Callable[[bool], list[dict]]
    key: Callable[[dict], dict]
    build: Callable[[dict, dict, torch.device], Callable[[], object]]


# ----------------------------------------------------------------------------------------------------------
# quantize / dequantize

# A resnet50-like activation per sample (64 channels at 56x56); batch sizes span the numel buckets that training
# at batch 1..128 produces.
_QUANT_SAMPLE = (64, 56, 56)
_QUANT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
_QUANT_BATCHES_QUICK = (1, 16, 128)


def _quant_problems(quick: bool) -> list[dict]:
    batches = _QUANT_BATCHES_QUICK if quick else _QUANT_BATCHES
    return [{"shape": (n, *_QUANT_SAMPLE), "bits": bits} for bits in (8, 4, 2) for n in batches]


def _quant_key(problem: dict) -> dict:
    return {"bits": problem["bits"], "numel": math.prod(problem["shape"])}


def _quant_inputs(problem: dict, device):
    shape, bits = problem["shape"], problem["bits"]
    C, inner, numel = shape[1], math.prod(shape[2:]), math.prod(shape)
    x = torch.randn(shape, device=device)
    lo = torch.full((C,), -3.0, device=device)
    step = torch.full((C,), 6.0 / (1 << bits), device=device)
    return x, lo, step, bits, C, inner, numel, (numel * bits + 7) // 8


def _build_quantize(config: dict, problem: dict, device) -> Callable[[], object]:
    from tritonact.kernels.quantize import _grid, _quantize_fwd_kernel

    x, lo, step, bits, C, inner, numel, nbytes = _quant_inputs(problem, device)
    rstep = 1.0 / step
    out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    grid = _grid(nbytes, config["BLOCK"])
    return lambda: _quantize_fwd_kernel[grid](
        out, x, lo, rstep, numel, nbytes, inner, C, BITS=bits, BLOCK=config["BLOCK"], num_warps=config["num_warps"]
    )


def _build_dequantize(config: dict, problem: dict, device) -> Callable[[], object]:
    from tritonact.kernels.quantize import _dequantize_fwd_kernel, _grid

    x, lo, step, bits, C, inner, numel, nbytes = _quant_inputs(problem, device)
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    grid = _grid(nbytes, config["BLOCK"])
    return lambda: _dequantize_fwd_kernel[grid](
        x, data, lo, step, numel, nbytes, inner, C, BITS=bits, BLOCK=config["BLOCK"], num_warps=config["num_warps"]
    )


# ----------------------------------------------------------------------------------------------------------
# fused BN + activation (kernels/bn_act.py): the launchers are timed whole, with the tuned kernel's config forced
# through kernels._config.forced_config (the launchers allocate their outputs; the same for every candidate).

# resnet50's BN inputs per sample (channels, spatial side), NCHW and channels_last (inner = 1)
_BN_SHAPES = ((64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7))
_BN_SHAPES_QUICK = ((64, 56), (512, 28), (2048, 7))


def _bn_problems(quick: bool) -> list[dict]:
    shapes = _BN_SHAPES_QUICK if quick else _BN_SHAPES
    return [
        {"shape": (32, c, s, s), "bits": bits, "channels_last": cl}
        for c, s in shapes
        for bits in (8, 4, 2)
        for cl in (False, True)
    ]


def _bn_key(kernel: str) -> Callable[[dict], dict]:
    from tritonact.kernels._config import size_bucket

    def key(problem: dict) -> dict:
        _, C, H, W = problem["shape"]
        spatial = 1 if problem["channels_last"] else H * W
        if kernel == "bn_stats":
            return {"spatial": spatial, "channels": size_bucket(C)}
        if kernel in ("bn_bwd_reduce", "bn_bwd"):
            return {"spatial": spatial, "channels": size_bucket(C), "bits": problem["bits"]}
        return {"spatial": spatial, "bits": problem["bits"]}

    return key


def _bn_unit(problem: dict, device):
    from tritonact import reference as ref
    from tritonact.quant import memory_order

    y = torch.randn(problem["shape"], device=device)
    if problem["channels_last"]:
        y = y.contiguous(memory_format=torch.channels_last)
    C, bits = y.shape[1], problem["bits"]
    gamma, beta = torch.ones(C, device=device), torch.zeros(C, device=device)
    mean, invstd = torch.zeros(C, device=device), torch.ones(C, device=device)
    P = ref.code_params(
        bits=bits,
        act="relu",
        wmin=torch.full((C,), -4.0, device=device),
        wmax=torch.full((C,), 4.0, device=device),
        wmean=mean,
        wstd=invstd,
        gamma=gamma,
        beta=beta,
        coded="xh",
        window=4.0,
        positive_fraction=0.75,
    )
    return y, gamma, beta, mean, invstd, P, bits, memory_order(y)


def _build_bn(kernel: str) -> Callable[[dict, dict, torch.device], Callable[[], object]]:
    def build(config: dict, problem: dict, device) -> Callable[[], object]:
        from tritonact.kernels import bn_act, bn_act_bwd
        from tritonact.kernels._config import forced_config

        y, gamma, beta, mean, invstd, P, bits, perm = _bn_unit(problem, device)
        data = bn_act.bn_act_forward(y, None, mean, invstd, gamma, beta, P, None, bits, "relu")[1]
        if kernel == "bn_stats":
            call = lambda: bn_act.bn_stats_forward(y)
        elif kernel == "bn_fwd":
            call = lambda: bn_act.bn_act_forward(y, None, mean, invstd, gamma, beta, P, None, bits, "relu")
        elif kernel == "bn_decode":
            call = lambda: bn_act.decode_act(data, P, bits, tuple(y.shape), perm, "relu", torch.float32)
        else:
            g = torch.randn_like(y)
            call = lambda: bn_act_bwd.unit_backward(g, data, P, bits, tuple(y.shape), perm, "relu", gamma, beta, invstd)

        def fn():
            with forced_config(kernel, config):
                return call()

        return fn

    return build


# ----------------------------------------------------------------------------------------------------------
# REGISTRY: every kernel `tritonact autotune` tunes, by its name in kernels/_config.py.
REGISTRY: dict[str, Tunable] = {
    "quantize": Tunable("quantize", _quant_problems, _quant_key, _build_quantize),
    "dequantize": Tunable("dequantize", _quant_problems, _quant_key, _build_dequantize),
    **{
        k: Tunable(k, _bn_problems, _bn_key(k), _build_bn(k))
        for k in ("bn_stats", "bn_fwd", "bn_decode", "bn_bwd_reduce", "bn_bwd")
    },
}


# ----------------------------------------------------------------------------------------------------------
# tuning


def tune(
    entries: list[Tunable], device, time_ms: Callable[[Callable], float], quick: bool = False, progress=None
) -> dict:
    """``{tuning_key: winning config}`` over every problem of every entry; ``time_ms(fn)`` times one launch.

    Problems whose keys fall into the same bucket are timed together: a config's score in a bucket is the sum of
    its times over the bucket's problems. A config that fails to compile or launch is skipped.
    """
    from tritonact.kernels._config import bucketed, candidates, tuning_key

    scores: dict[str, dict[int, float]] = {}
    configs: dict[str, list[dict]] = {}
    for entry in entries:
        cands = candidates(entry.kernel)
        for problem in entry.problems(quick):
            k = tuning_key(entry.kernel, **bucketed(**entry.key(problem)))
            configs[k] = cands
            s = scores.setdefault(k, {})
            for i, cfg in enumerate(cands):
                if s.get(i, 0.0) == math.inf:
                    continue
                try:
                    t = float(time_ms(entry.build(cfg, problem, device)))
                except Exception:  # a config this GPU cannot run (resources, compile error): never the winner
                    t = math.inf
                s[i] = s.get(i, 0.0) + t
            if progress is not None:
                progress.update(1)
    winners = {}
    for k, s in scores.items():
        best = min(s, key=s.get)
        if s[best] < math.inf:
            winners[k] = dict(configs[k][best])
    return winners


def _do_bench(quick: bool) -> Callable[[Callable], float]:
    from triton.testing import do_bench

    warmup, rep = (5, 20) if quick else (25, 100)
    return lambda fn: do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _no_gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False); autotuning times Triton kernels on a GPU"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set: kernels run under Triton's interpreter, there is nothing to tune"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton package is not importable"
    return None


def _select(names: str | None, parser) -> list[Tunable]:
    if names is None:
        return list(REGISTRY.values())
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in wanted if n not in REGISTRY]
    if bad or not wanted:
        parser.error(f"--kernels takes a comma-separated subset of {', '.join(REGISTRY)}; got {names!r}")
    return [REGISTRY[n] for n in wanted]


def run(args, parser) -> int:
    """The ``tritonact autotune`` command."""
    entries = _select(args.kernels, parser)
    reason = _no_gpu_reason()
    if reason is not None:
        print(f"tritonact autotune: {reason}", file=sys.stderr)
        return 1

    import triton
    from tqdm.auto import tqdm

    from tritonact.kernels._config import config_path, reload_tuned

    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    out: Path = args.out if args.out is not None else config_path(name)
    total = sum(len(e.problems(args.quick)) for e in entries)
    with tqdm(total=total, unit="problem", desc="autotune", file=sys.stderr) as bar:
        winners = tune(entries, device, _do_bench(args.quick), args.quick, bar)

    configs = {}
    if out.exists():  # keep what other kernels tuned before, if it was tuned here
        try:
            old = json.loads(out.read_text())
            if old.get("device") == name and old.get("triton") == triton.__version__:
                configs = dict(old.get("configs", {}))
        except (OSError, ValueError):
            pass
    configs.update(winners)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"device": name, "triton": triton.__version__, "configs": configs}, indent=2, sort_keys=True)
    )
    reload_tuned()
    print(f"tritonact autotune: {len(winners)} configs for {', '.join(e.kernel for e in entries)} on {name} -> {out}")
    return 0
