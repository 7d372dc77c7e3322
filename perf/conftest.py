import os

import pytest
import torch

import tritonact


def pytest_benchmark_update_machine_info(config, machine_info):
    import platform

    machine_info["torch"] = torch.__version__
    machine_info["tritonact"] = tritonact.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["cpu_threads"] = torch.get_num_threads()
    machine_info["platform"] = platform.platform()


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    """True when benchmarks are disabled (CI smoke run): use tiny shapes, just prove the code paths run."""
    cfg = request.config
    disabled = cfg.getoption("benchmark_disable") and not cfg.getoption("benchmark_enable")
    return bool(disabled) or os.environ.get("TRITONACT_BENCH_SMOKE") == "1"


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
