"""Kernel throughput: quantize / dequantize, the fused BN+ReLU unit forward and backward, and decoding.

On a GPU the Triton launchers of ``tritonact.kernels`` run (``bn_stats`` and ``bn_act_fwd`` are the two passes of
``unit_forward``, timed on their own too); on CPU the torch path. Each records ``GB/s``: the bytes the op must move
(formulas in perf/_workloads.py, e.g. ``unit_backward``: ``2*(N*e + K) + N*e`` for ``N`` elements of ``e`` bytes and
``K`` bytes of codes) over the median time, and ``peak_mib``: what one call allocates (outputs and temporaries).
Compare the GB/s with the device's copy bandwidth (perf/gpu_report.py measures both).
"""

import os

import pytest
import torch

from perf._util import bench_call
from perf._workloads import GPU_ONLY, kernel_case

FULL_GPU = (64, 256, 56, 56)  # 205 MB of fp32: well beyond any L2
FULL_CPU = (16, 256, 56, 56)  # 51 MB of fp32: beyond the caches, and a full CPU run stays within minutes
SMOKE = (2, 8, 7, 7)

CASES = [(k, b) for k in ("quantize", "dequantize", "unit_forward", "unit_backward") for b in (8, 4, 2)]
CASES += [("decode_act", 4), ("bn_stats", 4), ("bn_act_fwd", 4)]


def _shape(smoke, device):
    if smoke:
        return SMOKE
    override = os.environ.get("TRITONACT_BENCH_SHAPE")  # e.g. "64,256,56,56"
    if override:
        try:
            shape = tuple(int(v) for v in override.split(","))
        except ValueError:
            raise ValueError(f"TRITONACT_BENCH_SHAPE must be ints like 64,256,56,56, got {override!r}") from None
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"TRITONACT_BENCH_SHAPE must be 4 positive ints (N,C,H,W), got {override!r}")
        return shape
    return FULL_GPU if device == "cuda" else FULL_CPU


def _skip_if_interpreted(smoke, device):
    if device == "cuda" and not smoke and os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: these would be the interpreter's timings (run `pytest perf` on its own)")


@pytest.mark.parametrize("kernel,bits", CASES, ids=[f"{k}-{b}bit" for k, b in CASES])
def test_kernel(benchmark, kernel, bits, smoke, device):
    if kernel in GPU_ONLY and device != "cuda":
        pytest.skip(f"{kernel} is a Triton launcher (GPU only); the CPU path is timed whole in unit_forward")
    _skip_if_interpreted(smoke, device)
    shape = _shape(smoke, device)
    case = kernel_case(kernel, bits, shape, device)
    benchmark.group = f"kernel {kernel} {'x'.join(map(str, shape))} {device}"
    benchmark.extra_info.update(kernel=kernel, bits=bits, shape=list(shape), dtype=str(case.dtype))
    bench_call(benchmark, case.fn, device, case.nbytes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 channels_last kernels: GPU only")
@pytest.mark.parametrize("kernel", ["unit_forward", "unit_backward"])
def test_kernel_bf16_channels_last(benchmark, kernel, smoke, device):
    """The layout and dtype of mixed-precision training (autocast, channels_last)."""
    _skip_if_interpreted(smoke, device)
    shape = _shape(smoke, device)
    case = kernel_case(kernel, 4, shape, device, dtype=torch.bfloat16, channels_last=True)
    benchmark.group = f"kernel {kernel} {'x'.join(map(str, shape))} bf16-cl {device}"
    benchmark.extra_info.update(kernel=kernel, bits=4, shape=list(shape), dtype="bfloat16", channels_last=True)
    bench_call(benchmark, case.fn, device, case.nbytes)


# resnet50's 1x1 convolutions at 8 x 64x64: (N, C_in, H, W, C_out) of the last stage (2x2 planes), stage 3 (4x4),
# stage 2 (8x8) and stage 1 (16x16)
POINTWISE = [(8, 2048, 2, 2, 512), (8, 1024, 4, 4, 256), (8, 512, 8, 8, 128), (8, 256, 16, 16, 64)]


@pytest.mark.parametrize("way", ["gemm", "convolution_backward"])
@pytest.mark.parametrize("shape", POINTWISE, ids=lambda s: "x".join(map(str, s)))
def test_pointwise_conv_backward(benchmark, way, shape, smoke, device):
    """A 1x1 convolution's input and weight gradients: the coded conv's matrix products over the whole batch
    (``tritonact.ops.coded``, used up to ``SMALL_PLANE`` positions a plane) against PyTorch's own backward."""
    from tritonact.ops.coded import _gemm_input_grad, _gemm_weight_grad

    N, Ci, H, W, Co = (2, 16, *shape[2:4], 8) if smoke else shape
    x = torch.randn(N, Ci, H, W, device=device)
    w = torch.randn(Co, Ci, 1, 1, device=device)
    g = torch.randn(N, Co, H, W, device=device)

    def torch_backward():
        args = (None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
        return torch.ops.aten.convolution_backward(g, x, w, *args)[:2]

    def gemm():
        return _gemm_input_grad(g, w).contiguous(), _gemm_weight_grad(g, x)

    fn = gemm if way == "gemm" else torch_backward
    (gi, gw), want = fn(), torch_backward()
    for got, exp in ((gi, want[0]), (gw, want[1])):  # (fp32 sums in another order)
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5 * exp.abs().max().item())
    benchmark.group = f"pointwise conv backward {'x'.join(map(str, shape))} {device}"
    benchmark.extra_info.update(way=way, shape=list(shape))
    bench_call(benchmark, fn, device, 4 * (x.numel() + g.numel() * 2 + w.numel() * 2))


# resnet50's strided 1x1 convolutions (the downsamples of stages 2-4) at 16 x 128x128 and 8 x 64x64: (N, C_in, H, W,
# C_out), stride 2
STRIDED = [(16, 256, 32, 32, 512), (16, 512, 16, 16, 1024), (16, 1024, 8, 8, 2048), (8, 256, 16, 16, 512),
           (8, 512, 8, 8, 1024), (8, 1024, 4, 4, 2048)]  # fmt: skip


@pytest.mark.parametrize("way", ["coded", "conv_transpose2d"])
@pytest.mark.parametrize("shape", STRIDED, ids=lambda s: "x".join(map(str, s)))
def test_strided_pointwise_input_grad(benchmark, way, shape, smoke, device):
    """A stride-2 1x1 convolution's input gradient: the coded conv's (``ops.coded.pointwise_input_grad``: ``W^T g``
    placed at the positions the convolution read) against ``conv_transpose2d``, which it replaced."""
    from tritonact.ops.coded import pointwise_input_grad

    N, Ci, H, W, Co = (2, 16, 8, 8, 8) if smoke else shape
    w = torch.randn(Co, Ci, 1, 1, device=device)
    g = torch.randn(N, Co, (H + 1) // 2, (W + 1) // 2, device=device)
    out_pad = [H - 2 * (g.shape[2] - 1) - 1, W - 2 * (g.shape[3] - 1) - 1]

    def fn():
        if way == "coded":
            return pointwise_input_grad(g, w, [2, 2], [Ci, H, W])
        return torch.nn.functional.conv_transpose2d(g, w, None, 2, 0, out_pad)

    want = torch.nn.functional.conv_transpose2d(g, w, None, 2, 0, out_pad)
    torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())  # (sums in another order)
    benchmark.group = f"strided 1x1 input grad {'x'.join(map(str, shape))} {device}"
    benchmark.extra_info.update(way=way, shape=list(shape))
    bench_call(benchmark, fn, device, 4 * (g.numel() + N * Ci * H * W + w.numel()))
