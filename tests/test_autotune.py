"""tritonact autotune's registry: every kernel's benchmark builds and launches (interpreter, tiny problems), the
keys it writes are the ones launch_config looks up, and a forced config is what the launchers use."""

import pytest
import torch

pytest.importorskip("triton")

from tritonact.kernels import _config  # noqa: E402

from tritonact import autotune  # noqa: E402


def tiny(name, problem):
    if name.startswith("bn_"):
        return dict(problem, shape=(2, max(problem["shape"][1] // 32, 2), 3, 3))
    return dict(problem, shape=(2, 3, 3, 3))


@pytest.mark.parametrize("name", sorted(autotune.REGISTRY))
def test_every_registered_kernel_builds_and_runs(name, monkeypatch):
    if not _config.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    entry = autotune.REGISTRY[name]
    seen = []
    real = _config.launch_config

    def spy(kernel, **key):
        cfg = real(kernel, **key)
        seen.append((kernel, _config.tuning_key(kernel, **_config.bucketed(**key)), cfg))
        return cfg

    for mod in ("tritonact.kernels.bn_act", "tritonact.kernels.quantize"):
        monkeypatch.setattr(f"{mod}.launch_config", spy)
    problem = tiny(name, entry.problems(True)[0])
    forced = dict(_config.candidates(name)[0], BLOCK=512)
    fn = entry.build(forced, problem, torch.device("cpu"))
    seen.clear()
    fn()
    if not name.startswith("bn_"):  # the quantize builders launch their kernel with the config directly
        return
    launched = [(key, cfg) for k, key, cfg in seen if k == name]
    assert launched, f"{name} was not launched"
    assert all(cfg == forced for _, cfg in launched)
    assert {key for key, _ in launched} == {_config.tuning_key(name, **_config.bucketed(**entry.key(problem)))}


def test_forced_config_is_scoped():
    with _config.forced_config("bn_fwd", {"BLOCK": 64, "num_warps": 2}):
        assert _config.launch_config("bn_fwd", bits=4, spatial=9) == {"BLOCK": 64, "num_warps": 2}
    assert _config.launch_config("bn_fwd", bits=4, spatial=9) != {"BLOCK": 64, "num_warps": 2}
