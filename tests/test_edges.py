"""Units read by an activation whose derivative jumps (Hardswish, Hardsigmoid: at +-3; LeakyReLU, PReLU, SELU: at 0)
put bin edges there."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tritonact
from tritonact import fidelity
from tritonact import reference as ref


def side(v, edge):
    return (v > -edge).int() + (v > edge).int()


def coded(bits, coded_as, edge, seed=0):
    """``(output, decoded output, bin width in output units)`` of one unit's code with act "none" (8 bits: the
    observed range; 4 bits: the default 3.5-sigma window)."""
    g = torch.Generator().manual_seed(seed)
    C = 16
    w = torch.randn(8, C, 6, 6, generator=g) * 1.5
    gamma = torch.randn(C, generator=g) * 2
    gamma[0], gamma[1] = 0.0, -1.0  # a constant channel, a negative scale
    beta = torch.randn(C, generator=g)
    b = ref.bview
    if coded_as == "xh":
        w = (w - w.mean((0, 2, 3), keepdim=True)) / w.std((0, 2, 3), keepdim=True)
        out = w * b(gamma, w) + b(beta, w)
    else:
        out = w * 3
        w = out
    stats = ref.value_stats(w, coded_as)
    window = math.inf if bits == 8 else 3.5
    P = ref.code_params(
        bits=bits, act="none", wmin=stats[0], wmax=stats[1], wmean=stats[2], wstd=stats[3], gamma=gamma, beta=beta,
        coded=coded_as, window=window, positive_fraction=0.75, edge=edge,
    )  # fmt: skip
    data = ref.encode_ref(w, P, bits, "none")
    dec = ref.decode_act_ref(data, P, bits, tuple(w.shape), (0, 1, 2, 3), "none", torch.float32)
    step = b(P[ref.R["A"]].abs() * P[ref.R["dp"]], w)
    return out, dec, step


@pytest.mark.parametrize("edge", [3.0, 0.0])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("coded_as", ["xh", "sum"])
def test_edge_grid_keeps_every_value_on_its_side_of_the_jumps(bits, coded_as, edge):
    out, dec, _ = coded(bits, coded_as, -1.0)
    assert (side(out, edge) != side(dec, edge)).sum() > 0  # plain grids do carry values across on this data
    out, dec, step = coded(bits, coded_as, edge)
    assert torch.equal(side(out, edge), side(dec, edge))
    if bits == 8:  # no window: every value inside its bin (the grid still covers the channel's range)
        assert ((out - dec).abs() <= step * 0.5 * (1 + 1e-4) + 1e-6).all()


class _Net(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.c1, self.bn, self.act, self.c2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act, nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.c2(self.act(self.bn(self.c1(x))))


class _Functional(_Net):
    def forward(self, x):
        return self.c2(F.hardsigmoid(self.bn(self.c1(x))))


@pytest.mark.parametrize(
    "model, edge",
    [
        (_Net(nn.Hardswish()), 3.0),
        (_Functional(nn.Identity()), 3.0),
        (_Net(nn.LeakyReLU(0.1)), 0.0),
        (_Net(nn.SiLU()), -1.0),
        (_Net(nn.ReLU()), -1.0),
    ],
    ids=["hardswish", "functional-hardsigmoid", "leaky-relu", "silu", "relu"],
)
def test_units_read_by_a_jumping_activation_get_edges(model, edge):
    with tritonact.approximate(model, bits=8) as ctx:
        model(torch.randn(2, 3, 12, 12)).sum().backward()
        (unit,) = ctx.report().units
    assert unit.edge == edge
    with tritonact.approximate(model, bits=8, generic=False) as ctx:  # the activation keeps its own input
        (unit,) = ctx.report().units
    assert unit.edge == -1.0


def test_mobilenet_v3_large_8_bit_error():
    """Measured (8 x 64x64, seed 0, conv weight gradient median / max): 0.030 / 0.040 with plain grids, 0.013 /
    0.017 with the edges (docs/coverage.md); the bound sits between them."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_large(num_classes=10)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    t = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    errs = sorted(e for _, _, e in fidelity.grad_errors(model, x, t, bits=8, forward_rtol=1e-5))
    assert errs[len(errs) // 2] < 0.02, errs[len(errs) // 2]


def _leaky(m):
    for n, c in m.named_children():
        if isinstance(c, nn.ReLU):
            setattr(m, n, nn.LeakyReLU(0.1))
        else:
            _leaky(c)
    return m


def test_resnet18_with_leaky_relu_4_bit_error():
    """Every unit's output is read by a LeakyReLU, whose slope jumps at 0. Measured (8 x 64x64, seed 0, conv weight
    gradient median): 4 bits 0.50 with plain grids (8 bits 0.137), 0.099 with an edge at 0 (8 bits 0.0070), as
    resnet18 with ReLU (0.098); the bound sits between them."""
    torch.manual_seed(0)
    model = _leaky(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    t = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    errs = sorted(e for _, _, e in fidelity.grad_errors(model, x, t, bits=4, forward_rtol=1e-5))
    assert errs[len(errs) // 2] < 0.15, errs[len(errs) // 2]
