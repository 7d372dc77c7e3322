"""Kernel throughput: quantize / dequantize (torch backend on CPU, Triton on GPU)."""

import pytest
import torch

import tritonact
from perf._util import record_bandwidth, synced

FULL = (64, 256, 56, 56)
SMOKE = (2, 8, 7, 7)


@pytest.fixture
def activation(smoke, device):
    shape = SMOKE if smoke else FULL
    x = torch.randn(shape, device=device)
    C = shape[1]
    return x, torch.full((C,), -3.0, device=device), torch.full((C,), 6.0 / 16, device=device)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize(benchmark, activation, bits, device):
    x, lo, step = activation
    benchmark.group = f"quantize-{tuple(x.shape)}"
    p = benchmark(synced(lambda: tritonact.quantize(x, bits, lo, step), device))
    record_bandwidth(benchmark, x.numel() * x.element_size() + p.data.numel())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_dequantize(benchmark, activation, bits, device):
    x, lo, step = activation
    p = tritonact.quantize(x, bits, lo, step)
    benchmark.group = f"dequantize-{tuple(x.shape)}"
    y = benchmark(synced(lambda: tritonact.dequantize(p), device))
    assert y.shape == x.shape
    record_bandwidth(benchmark, x.numel() * x.element_size() + p.data.numel())
