"""The Triton quantize/dequantize kernels equal the torch reference bit for bit (interpreter on CPU, or GPU)."""

import pytest
import torch

import tritonact

pytest.importorskip("triton")

BITS = (1, 2, 4, 8)
CASES = [
    ((1, 1, 5), torch.float32, False),
    ((2, 3, 7, 7), torch.float32, False),
    ((1, 63, 3, 3), torch.float32, False),
    ((2, 5, 3, 7), torch.float32, True),
    ((2, 3, 5, 5), torch.float16, False),
    ((2, 3, 5, 5), torch.bfloat16, True),
    ((3, 4), torch.float32, False),
    ((1, 3, 2, 3, 3), torch.float32, False),
]


def case_id(c):
    shape, dtype, cl = c
    return "x".join(map(str, shape)) + "-" + str(dtype).split(".")[-1] + ("-cl" if cl else "")


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def make(shape, dtype, cl, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x.view(-1)[::11] = float("nan")
    x.view(-1)[3::13] = float("inf")
    x.view(-1)[5::17] = float("-inf")
    x = x.to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    lo = -4 + torch.rand(C, generator=g)
    step = 0.05 + torch.rand(C, generator=g) * 2
    return x.to(device), lo.to(device), step.to(device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_equals_torch(case, bits, device, poison_empty):
    if device == "cpu" and not tritonact.quant.interpreter_enabled():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    x, lo, step = make(*case, device)
    pt = tritonact.quantize(x, bits, lo, step, backend="triton")
    pr = tritonact.quantize(x.cpu(), bits, lo.cpu(), step.cpu(), backend="torch")
    torch.testing.assert_close(pt.data.cpu(), pr.data, rtol=0, atol=0)
    yt = tritonact.dequantize(pt, backend="triton")
    yr = tritonact.dequantize(pr, backend="torch")
    assert yt.stride() == yr.stride() == x.stride()
    torch.testing.assert_close(yt.cpu(), yr, rtol=0, atol=0, equal_nan=False)
