import os
import platform

import pytest
import torch

import tritonact


def _smoke(config) -> bool:
    disabled = config.getoption("benchmark_disable") and not config.getoption("benchmark_enable")
    return bool(disabled) or os.environ.get("TRITONACT_BENCH_SMOKE") == "1"


def _threads(config) -> int | None:
    """CPU threads for the benchmarks: ``TRITONACT_BENCH_THREADS`` if set; 1 in the smoke run (a busy CI machine
    with more threads than free cores can make a multi-threaded op hundreds of times slower); else torch's default."""
    env = os.environ.get("TRITONACT_BENCH_THREADS")
    if env:
        return int(env)
    return 1 if _smoke(config) else None


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["tritonact"] = tritonact.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["cpu_threads"] = _threads(config) or torch.get_num_threads()
    machine_info["platform"] = platform.platform()


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    """True when benchmarks are disabled (CI smoke run): use tiny shapes, just prove the code paths run.
    ``TRITONACT_BENCH_SMOKE=1`` forces it."""
    return _smoke(request.config)


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _bench_threads(request):
    n = _threads(request.config)
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)
