"""The ``tritonact`` command: verbs, the demo's outputs, autotune without a GPU, argument errors."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tritonact import autotune, cli, demo
from tritonact.demo import MODES

RUN_KEYS = (
    "mode",
    "test_accuracy",
    "final_loss",
    "activation_mib_per_sample",
    "peak_mib",
    "step_time_s",
    "step_time_ratio",
)


def test_help_lists_the_verbs():
    out = subprocess.run(
        [sys.executable, "-m", "tritonact.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for verb in ("demo", "bench", "autotune"):
        assert verb in out


def test_no_verb_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    assert "demo" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_results_and_figure(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("torchvision")
    out = tmp_path / "demo"
    # reduced setting: 2 steps per mode; the full run is `tritonact demo`
    rc = cli.main(["demo", "--epochs", "1", "--train-samples", "64", "--batch-size", "32", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    assert [r["mode"] for r in runs] == list(MODES)
    for r in runs:
        for k in RUN_KEYS:
            assert k in r, k
        for k in RUN_KEYS[1:]:
            assert math.isfinite(r[k]) and r[k] >= 0, (r["mode"], k, r[k])
        assert 0 <= r["test_accuracy"] <= 1
    assert runs[0]["step_time_ratio"] == 1.0
    act = {r["mode"]: r["activation_mib_per_sample"] for r in runs}
    assert act["exact"] > act["8-bit"] > act["4-bit"] > act["2-bit"] > 0
    assert res["machine"]["torch"] == torch.__version__
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    for mode in MODES:
        assert mode in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_autotune_without_gpu_exits_nonzero_with_reason(capsys):
    rc = cli.main(["autotune"])
    assert rc != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no CUDA GPU" in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--epochs", "0"], "'0'"),
        (["demo", "--batch-size", "many"], "'many'"),
        (["demo", "--seed", "-1"], "'-1'"),
        (["demo", "--lr", "nan"], "'nan'"),
        (["demo", "--modes", "exact,3-bit"], "3-bit"),
        (["demo", "--data", "mnist"], "mnist"),
        (["demo", "--data", "cifar10"], "--data-dir"),
        (["demo", "--data", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
        (["demo", "--device", "tpu"], "tpu"),
        (["demo", "--quick", "--epochs", "3"], "--epochs 3"),
        (["autotune", "--kernels", "quantize,warp"], "warp"),
        (["frobnicate"], "frobnicate"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else None,
)
def test_bad_arguments_name_the_value(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def test_demo_checks_its_output_folder_before_training(tmp_path, capsys, monkeypatch):
    """Before: trained to the end, then failed with a traceback and lost the table."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(demo, "run_mode", lambda *a: pytest.fail("trained before checking --out"))
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--quick", "--out", str(blocker / "sub")])
    assert e.value.code == 2
    assert f"--out {blocker / 'sub'}: cannot write there" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_demo_on_cuda_without_gpu_is_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "cuda"])
    assert "no CUDA GPU" in capsys.readouterr().err


def test_demo_cifar10_missing_copy_is_a_clear_error(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "no CIFAR-10" in str(e.value.code) and str(tmp_path) in str(e.value.code)


def test_bench_passes_options_to_pytest():
    rc = cli.bench(["--collect-only", "-q", "-k", "quantize", "-p", "no:cacheprovider"])
    assert rc == 0


def test_autotune_winners_use_launch_config_keys(monkeypatch):
    from tritonact.kernels import _config

    cands = [{"BLOCK": 256, "num_warps": 4}, {"BLOCK": 512, "num_warps": 8}]
    monkeypatch.setattr(_config, "candidates", lambda kernel: cands)

    def problems(quick):
        return [{"numel": 1100, "bits": 4}, {"numel": 1500, "bits": 4}, {"numel": 5000, "bits": 2}]

    def build(config, problem, device):
        return lambda: 1.0 if config["BLOCK"] == 512 else 2.0  # fake time: BLOCK 512 wins

    def broken(config, problem, device):
        raise RuntimeError("out of resources")

    entries = [
        autotune.Tunable("quantize", problems, lambda p: dict(p), build),
        autotune.Tunable("dequantize", problems, lambda p: dict(p), broken),
    ]
    winners = autotune.tune(entries, "cpu", time_ms=lambda fn: fn())
    # 1100 and 1500 share the 2048 bucket; configs that never run are never winners
    assert winners == {
        _config.tuning_key("quantize", bits=4, numel=2048): cands[1],
        _config.tuning_key("quantize", bits=2, numel=8192): cands[1],
    }
    monkeypatch.setattr(_config, "_tuned", lambda: winners)
    assert _config.launch_config("quantize", bits=4, numel=1500) == cands[1]
    assert _config.launch_config("quantize", bits=2, numel=4097) == cands[1]


def test_registry_covers_the_quantizer_kernels():
    from tritonact.kernels._config import candidates

    assert {"quantize", "dequantize"} <= set(autotune.REGISTRY)
    for name, entry in autotune.REGISTRY.items():
        assert entry.kernel == name
        candidates(name)  # a name kernels/_config.py knows
        probs = entry.problems(True)
        assert probs and len(probs) <= len(entry.problems(False))
        assert all(set(entry.key(p)) == {"bits", "numel"} for p in probs if name in ("quantize", "dequantize"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_autotune_on_gpu_writes_configs(tmp_path):
    # a fresh process: this one created its kernels under the interpreter (tests/conftest.py)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / "tuned.json"
    cmd = [sys.executable, "-m", "tritonact.cli", "autotune", "--quick", "--kernels", "quantize", "--out", str(path)]
    subprocess.run(cmd, env=env, check=True, timeout=600)
    data = json.loads(path.read_text())
    assert data["device"] == torch.cuda.get_device_name()
    assert data["configs"] and all(k.startswith("quantize|") for k in data["configs"])
