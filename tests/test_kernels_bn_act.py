"""The fused BN(+add)+activation kernels against their torch contracts (interpreter on CPU, or a GPU).

Codes and decoded values are compared bit for bit; whatever depends on a reduction order (statistics, outputs
computed from them, gradients) is compared with a tolerance that says where it comes from.
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tritonact
from tritonact import backends
from tritonact import reference as ref
from tritonact.config import ApproxConfig
from tritonact.quant import interpreter_enabled, memory_order

pytest.importorskip("triton")
from tritonact.kernels import bn_act as K  # noqa: E402
from tritonact.kernels import bn_act_bwd as KB  # noqa: E402

BITS = (2, 4, 8)
ACTS = ("relu", "relu6", "none")
JOINS = ("bn", "sum", "sum+xh")  # plain BN unit; residual join coding the sum; join that also stores an xh code
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# (shape, dtype, channels_last, rtol, atol) for values computed in fp32 and rounded to dtype. fp32: a few fp32 ulps
# of O(10) values (summation order of the statistics, torch's BN formula y * alpha + beta' against ours). fp16 and
# bf16: one ulp of the dtype (2**-10 and 2**-7 relative), as both sides round fp32 values that may differ in their
# last bits. atol covers values near zero, where the fp32 difference (~1e-6) is all there is.
CASES = [
    ((1, 3, 7, 7), torch.float32, False, 1e-5, 1e-5),
    ((2, 63, 7, 7), torch.float32, True, 1e-5, 1e-5),
    ((2, 3, 7, 7), torch.float16, True, 1e-3, 1e-5),
    ((1, 63, 7, 7), torch.bfloat16, False, 8e-3, 1e-5),
    ((3, 5, 1, 7), torch.float32, True, 1e-5, 1e-5),
]


def case_id(c):
    shape, dtype, cl = c[:3]
    return "x".join(map(str, shape)) + "-" + str(dtype).split(".")[-1] + ("-cl" if cl else "")


def need(device):
    if device == "cpu" and not interpreter_enabled():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")


def make(shape, dtype, cl, device, seed=0, residual=False):
    """``y`` (per-channel offsets, a wide range so that ReLU6 saturates), optional residual, gamma with a zero and a
    negative channel, beta."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    y = torch.randn(shape, generator=g) * 2 + torch.randn(C, 1, 1, generator=g)
    r = torch.randn(shape, generator=g) * 2 if residual else None
    gamma = torch.randn(C, generator=g) * 3
    gamma[0] = 0.0
    if C > 1:
        gamma[1] = -abs(gamma[1]) - 0.5
    beta = torch.randn(C, generator=g)
    fmt = torch.channels_last if cl else torch.contiguous_format
    y = y.to(dtype).contiguous(memory_format=fmt).to(device)
    if r is not None:
        r = r.to(dtype).contiguous(memory_format=fmt).to(device)
    return y, r, gamma.to(device), beta.to(device)


def make_spec(C, act, join, bits, device, momentum=0.1, track=True, edge=-1.0, pf=None):
    bn = nn.BatchNorm2d(C, momentum=momentum, track_running_stats=track).to(device)
    return SimpleNamespace(bn=bn, act=act, bits=bits, store_xh=join == "sum+xh", edge=edge, pf=pf)


def unit_forward(spec, backend, y, gamma, beta, r, out=None):
    """A unit's forward on ``backend`` as the unit's call site runs it (running statistics counted and copied
    back): ``(out, data, P, invstd, extra)``."""
    bn, cfg = spec.bn, ApproxConfig(bits=spec.bits)
    rm = rv = None
    eaf = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats:
        rm, rv = bn.running_mean, bn.running_var
        bn.num_batches_tracked.add_(1)
        eaf = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    out, data, P, invstd, xdata, xP, new_rm, new_rv = backends.get(backend).bn_act(
        y, gamma, beta, r, rm, rv, eaf, bn.eps, bits=spec.bits, act=spec.act, window=cfg.effective_window,
        pf=spec.pf if spec.pf is not None else cfg.positive_fraction_for(y.numel() // max(y.shape[1], 1)),
        store_xh=spec.store_xh, out=out, edge=spec.edge,
    )  # fmt: skip
    if rm is not None:
        rm.copy_(new_rm)
        rv.copy_(new_rv)
    return out, data, P, invstd, ((xdata, xP) if xdata is not None else ())


def coded_values(y, r, mean, invstd, gamma, beta):
    """``(s, w, xh)``: the unit's pre-activation output and its coded values, op by op as the forward kernel and
    the model compute them (BN's output in y's dtype, the join's add in the promoted dtype)."""
    y32 = y.float()
    xh = (y32 - ref.bview(mean, y32)) * ref.bview(invstd, y32)
    z = (xh * ref.bview(gamma, y32) + ref.bview(beta, y32)).to(y.dtype)
    if r is None:
        return z, xh, xh
    s = z + r
    return s, torch.empty_like(y32).copy_(s), xh  # codes follow y's memory order


def exact(a, b):
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------------------------
# forward


def run_forward(case, act, join, bits, device, seed=0, edge=-1.0, pf=None):
    shape, dtype, cl, rtol, atol = case
    y, r, gamma, beta = make(shape, dtype, cl, device, seed, residual=join != "bn")
    spec = make_spec(shape[1], act, join, bits, device, edge=edge, pf=pf)
    twin = copy.deepcopy(spec)  # its own BatchNorm2d, for the running statistics
    with torch.no_grad():
        got = unit_forward(spec, "triton", y, gamma, beta, r)
        want = unit_forward(twin, "torch", y, gamma, beta, r)
    return y, r, gamma, beta, spec, twin, got, want


def check_forward(case, act, join, bits, device, edge=-1.0, pf=None):
    shape, dtype, cl, rtol, atol = case
    y, r, gamma, beta, spec, twin, got, want = run_forward(case, act, join, bits, device, edge=edge, pf=pf)
    out, data, P, invstd, extra = got
    out_t, data_t, P_t, invstd_t, extra_t = want
    assert out.dtype == y.dtype and out.stride() == y.stride()  # memory format kept, no hidden copy
    torch.testing.assert_close(out, out_t, rtol=rtol, atol=atol)
    # fp32 statistics from the same data, reduced in another order: a few fp32 ulps
    torch.testing.assert_close(invstd, invstd_t, rtol=1e-5, atol=0)
    # the grids follow from those statistics (integer rows must agree exactly, rtol * value < 1)
    torch.testing.assert_close(P, P_t, rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(spec.bn, name), getattr(twin.bn, name), rtol=1e-5, atol=1e-6)
    # codes: bit-identical to encode_ref of the values the kernel coded, with the kernel's grid
    mean = K.bn_stats_forward(y)[0].float()  # deterministic: the statistics unit_forward used
    _, w, xh = coded_values(y, r, mean, invstd, gamma, beta)
    exact(data, ref.encode_ref(w, P, bits))
    assert data.numel() == math.ceil(y.numel() * bits / 8)
    assert len(extra) == len(extra_t) == (2 if join == "sum+xh" else 0)
    if extra:
        exact(extra[0], ref.encode_ref(xh, extra[1], bits))
        torch.testing.assert_close(extra[1], extra_t[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("join", JOINS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bits", BITS)
def test_forward_every_bits_and_act(bits, act, join, poison_empty):
    need("cpu")
    check_forward(CASES[0], act, join, bits, "cpu")


@pytest.mark.parametrize("join", JOINS)
@pytest.mark.parametrize("bits", [8, 4])
def test_forward_with_many_values_fraction(bits, join, poison_empty):
    """The positive fraction units with many values per channel use (0.875, ApproxConfig.positive_fraction_for):
    2 of 16 levels below the threshold at 4 bits; the kernel's grid and codes match the reference's."""
    need("cpu")
    check_forward(CASES[1], "relu", join, bits, "cpu", pf=0.875)
    P = run_forward(CASES[1], "relu", join, bits, "cpu", pf=0.875)[6][2]
    mixed = (P[ref.R["nneg"]] > 0) & (P[ref.R["nneg"]] < (1 << bits))  # channels with values on both sides
    assert mixed.any() and (P[ref.R["nneg"]][mixed] == round((1 << bits) * 0.125)).all()


@pytest.mark.parametrize("edge", [3.0, 0.0])
@pytest.mark.parametrize("join", ["bn", "sum"])
@pytest.mark.parametrize("bits", [8, 4])
def test_forward_with_bin_edges_at_a_jump(bits, join, edge, poison_empty):
    """A unit read by a Hardswish or a LeakyReLU (``UnitSpec.edge``): the same grid and codes in both backends."""
    need("cpu")
    check_forward(CASES[0], "none", join, bits, "cpu", edge=edge)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("join", JOINS)
@pytest.mark.parametrize("case", CASES[1:], ids=case_id)
def test_forward_layouts_and_dtypes(case, join, device, poison_empty):
    need(device)
    check_forward(case, "relu", join, 4, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum,track", [(0.3, True), (None, True), (0.1, False)], ids=["ema", "cma", "untracked"])
def test_running_stats_like_batchnorm2d(momentum, track, device):
    need(device)
    y, _, gamma, beta = make((2, 3, 7, 7), torch.float32, False, device)
    spec = make_spec(3, "relu", "bn", 4, device, momentum, track)
    bn = copy.deepcopy(spec.bn)
    with torch.no_grad():
        for step in range(3):
            unit_forward(spec, "triton", y + step, gamma, beta, None)
            bn(y + step)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(spec.bn, name), getattr(bn, name)
        assert (a is None) == (b is None)
        if a is not None:  # torch's CPU stats are float64 sums, ours fp32 Welford: a few fp32 ulps
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * (gamma = 0), by design
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("join", JOINS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_pass_bit_identical_with_specials(dtype, bits, act, join, device, poison_empty):
    """Given the statistics and grid, ``out`` and the codes equal the torch formulas bit for bit, also on bin edges,
    ReLU6 saturation, NaN and +-inf inputs."""
    need(device)
    shape = (2, 5, 3, 7)
    y, r, gamma, beta = make(shape, dtype, True, device, seed=1, residual=join != "bn")
    y = (y.float() * 8).round() / 8  # many values on the bin edges of the grid below
    flat = y.permute(0, 2, 3, 1).reshape(-1)  # channels_last: a view in memory order
    flat[::17], flat[5::23], flat[7::29] = float("nan"), float("inf"), float("-inf")
    y = y.to(dtype)
    mean = torch.linspace(-0.5, 0.5, shape[1], device=device)
    invstd = torch.full((shape[1],), 2.0, device=device)
    s, w, xh = coded_values(y, r, mean, invstd, gamma, beta)
    finite = torch.isfinite(w)
    C = shape[1]
    wmin = torch.where(finite, w, math.inf).amin(dim=(0, 2, 3))
    wmax = torch.where(finite, w, -math.inf).amax(dim=(0, 2, 3))
    grid = dict(bits=bits, gamma=gamma, beta=beta, window=math.inf, positive_fraction=0.75)
    P = ref.code_params(
        act=act,
        coded="xh" if r is None else "sum",
        wmin=wmin,
        wmax=wmax,
        wmean=torch.zeros(C, device=device),
        wstd=torch.ones(C, device=device),
        **grid,
    )
    if r is None:  # round steps for the plain unit: the edges are exactly representable
        P[ref.R["dp"]], P[ref.R["dn"]] = 0.25, 0.125
        P[ref.R["rdp"]], P[ref.R["rdn"]] = 4.0, 8.0
    xP = None
    if join == "sum+xh":
        xP = ref.code_params(
            act="none",
            coded="xh",
            wmin=wmin,
            wmax=wmax,
            wmean=torch.zeros(C, device=device),
            wstd=torch.ones(C, device=device),
            **grid,
        )
    out, data, xdata = K.bn_act_forward(y, r, mean, invstd, gamma, beta, P, xP, bits, act)
    assert out.dtype == s.dtype and out.stride() == y.stride()
    exact(out, ref.apply_act(s, act))
    exact(data, ref.encode_ref(w, P, bits))
    if xP is not None:
        exact(xdata, ref.encode_ref(xh, xP, bits))


@pytest.mark.parametrize(
    "y_dtype,r_dtype,r_format",
    [
        (torch.float32, torch.float32, torch.contiguous_format),
        (torch.float16, torch.float32, torch.channels_last),
        (torch.bfloat16, torch.float16, torch.channels_last),
        (torch.float16, torch.float16, torch.channels_last),
    ],
    ids=["nchw-residual", "fp16+fp32", "bf16+fp16", "fp16+fp16"],
)
def test_join_like_the_model(y_dtype, r_dtype, r_format, poison_empty):
    """A join's sum has the dtype and rounding of the model's own add; an NCHW residual joined to a channels_last y
    (the one layout that takes a copy) codes in y's memory order."""
    need("cpu")
    y, r, gamma, beta = make((2, 3, 7, 7), y_dtype, True, "cpu", residual=True)
    r = r.to(r_dtype).contiguous(memory_format=r_format)
    mean, invstd = torch.linspace(-1, 1, 3), torch.full((3,), 0.7)
    s, w, _ = coded_values(y, r, mean, invstd, gamma, beta)
    P = ref.code_params(
        bits=4,
        act="relu",
        wmin=w.amin((0, 2, 3)),
        wmax=w.amax((0, 2, 3)),
        wmean=torch.zeros(3),
        wstd=torch.ones(3),
        gamma=gamma,
        beta=beta,
        coded="sum",
        window=math.inf,
        positive_fraction=0.75,
    )
    out, data, _ = K.bn_act_forward(y, r, mean, invstd, gamma, beta, P, None, 4, "relu")
    exact(data, ref.encode_ref(w, P, 4))
    assert out.dtype == s.dtype == torch.promote_types(y_dtype, r_dtype) and out.stride() == y.stride()
    exact(out, torch.relu(s))
    smean, svar, smin, smax = K.bn_stats_forward(y, r, mean, invstd, gamma, beta)
    exact(smin, w.amin((0, 2, 3)))
    exact(smax, w.amax((0, 2, 3)))
    var, m = torch.var_mean(w.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(smean, m, rtol=0, atol=1e-6)  # fp32 per-lane Welford against float64
    torch.testing.assert_close(svar, var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense", [True, False], ids=["slot-like-y", "nchw-slot"])
def test_forward_into_given_output(dense, poison_empty):
    """``out=`` (a ring slot) receives the same output; written in place when dense in y's memory order."""
    need("cpu")
    case = CASES[1]
    y, r, gamma, beta = make(case[0], case[1], case[2], "cpu", residual=True)
    spec = make_spec(case[0][1], "relu", "sum", 4, "cpu")
    want = unit_forward(copy.deepcopy(spec), "triton", y, gamma, beta, r)[0]
    slot = torch.full_like(y, float("nan")) if dense else torch.full(y.shape, float("nan"))  # y is channels_last
    out = unit_forward(spec, "triton", y, gamma, beta, r, out=slot)[0]
    assert out is slot
    exact(slot, want)


# ----------------------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[3]], ids=case_id)
def test_decode_bit_identical(case, bits, act, device, poison_empty):
    need(device)
    shape, dtype, cl = case[:3]
    y, _, gamma, beta = make(shape, dtype, cl, device)
    C, perm = shape[1], memory_order(y)
    g = torch.Generator().manual_seed(bits)
    wmin, wmax = -3 - torch.rand(C, generator=g), 3 + torch.rand(C, generator=g)
    P = ref.code_params(
        bits=bits,
        act=act,
        wmin=wmin.to(device),
        wmax=wmax.to(device),
        wmean=torch.zeros(C, device=device),
        wstd=torch.ones(C, device=device),
        gamma=gamma,
        beta=beta,
        coded="xh",
        window=2.5,
        positive_fraction=0.75,
    )
    nbytes = math.ceil(y.numel() * bits / 8)
    data = torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8).to(device)  # every code, saturated too
    args = (data, P, bits, tuple(shape), perm)
    a = K.decode_act(*args, act, dtype)
    a_ref = ref.decode_act_ref(*args, act, dtype)
    assert a.dtype == dtype and a.stride() == a_ref.stride() == y.stride()
    exact(a, a_ref)
    w, mask = K.decode_value(*args)
    w_ref, mask_ref = ref.decode_value_ref(*args)
    assert mask.dtype == torch.bool and w.stride() == y.stride()
    exact(w, w_ref)
    exact(mask, mask_ref)


# ----------------------------------------------------------------------------------------------------------
# backward


def check_backward(case, act, join, bits, device, expanded=False):
    shape, dtype, cl, rtol, atol = case
    y, r, gamma, beta, spec, _, got, _ = run_forward(case, act, join, bits, device)
    out, data, P, invstd, extra = got
    g = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(device)
    g = g.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    if expanded:  # what autograd hands over for out.sum()
        g = torch.ones((), dtype=dtype, device=device).expand(shape)
    residual = r if join == "sum" else None
    xh_code = extra if join == "sum+xh" else None
    args = (data, P, bits, tuple(shape), memory_order(y), act, gamma, beta, invstd, residual, xh_code)
    g_y, g_gamma, g_beta, g_res = KB.unit_backward(g, *args)
    w_y, w_gamma, w_beta, w_res = ref.unit_backward_ref(g, *args)
    assert g_y.dtype == dtype and g_y.stride() == y.stride()
    # the kernel writes g_y in g's dtype (ops casts the reference's fp32 to it): compare after the same rounding
    torch.testing.assert_close(g_y, w_y.to(dtype), rtol=rtol, atol=atol)
    # fp32 sums of M <= 98 terms |g * xh~| <~ 12 in another order: |error| <~ M * 2**-24 * 12 < 1e-4
    sums = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_gamma, w_gamma, **sums)
    torch.testing.assert_close(g_beta, w_beta, **sums)
    assert (g_res is None) == (w_res is None) == (join == "bn")
    if g_res is not None:  # g_z = g * mask is exact in g's dtype
        exact(g_res, w_res.to(dtype))


@pytest.mark.parametrize("join", JOINS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bits", BITS)
def test_backward_every_bits_and_act(bits, act, join, poison_empty):
    need("cpu")
    check_backward(CASES[0], act, join, bits, "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("join", JOINS)
@pytest.mark.parametrize("case", CASES[1:], ids=case_id)
def test_backward_layouts_and_dtypes(case, join, device, poison_empty):
    need(device)
    check_backward(case, "relu", join, 4, device)


@pytest.mark.parametrize("join", JOINS)
@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=case_id)
def test_backward_in_place_matches_out_of_place(case, join, poison_empty):
    # inplace=True: g's buffer becomes g_y (a join's g_residual); every output bit for bit as out of place
    need("cpu")
    shape, dtype, cl = case[:3]
    y, r, gamma, beta, spec, _, got, _ = run_forward(case, "relu", join, 4, "cpu")
    data, P, invstd, extra = got[1], got[2], got[3], got[4]
    g = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    g = g.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    args = (data, P, 4, tuple(shape), memory_order(y), "relu", gamma, beta, invstd)
    kw = dict(residual=r if join == "sum" else None, xh_code=extra if join == "sum+xh" else None)
    want = KB.unit_backward(g, *args, **kw)
    g_in = g.clone()
    got = KB.unit_backward(g_in, *args, **kw, inplace=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            exact(a, b)
    reused = got[3] if join != "bn" else got[0]
    assert reused.data_ptr() == g_in.data_ptr()


@pytest.mark.parametrize("join", ["bn", "sum"])
def test_backward_expanded_gradient(join, poison_empty):
    need("cpu")
    check_backward(CASES[1], "relu6", join, 2, "cpu", expanded=True)


# ----------------------------------------------------------------------------------------------------------
# end to end


class TinyNet(nn.Module):
    """conv-bn-relu, then a block conv-bn-relu-conv-bn whose output joins the first activation, relu, head."""

    def __init__(self, c=4):
        super().__init__()
        self.conv0, self.bn0, self.relu0 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        h = self.relu0(self.bn0(self.conv0(x)))
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(h)))))
        return self.fc(self.relu2(y + h).mean((2, 3)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_end_to_end_matches_torch_backend(cl, device):
    need(device)
    torch.manual_seed(0)
    base = TinyNet().to(device)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 7, 7, device=device)
    if cl:
        base, x = base.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    target = torch.tensor([1, 3], device=device)
    runs = {}
    for backend in ("torch", "triton"):
        model = copy.deepcopy(base)
        with tritonact.approximate(model, bits=4, backend=backend) as ctx:
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
        assert len(ctx.report().units) == 3 and all(u.backend == backend for u in ctx.report().units)
        runs[backend] = loss.detach(), dict(model.named_parameters()), dict(model.named_buffers())
    (loss_t, params_t, bufs_t), (loss_r, params_r, bufs_r) = runs["triton"], runs["torch"]
    # the forward is exact on both backends; BN's formula differs by a few fp32 ulps
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-6)
    for name, p in params_r.items():
        # Same codes unless a value sits within an ulp of a bin edge (the statistics differ in their last bits); one
        # flipped code moves a gradient by about one bin / M. Measured: <= 1e-6 relative.
        err = (params_t[name].grad - p.grad).norm() / p.grad.norm()
        assert err < 1e-3, (name, err.item())
    for name, b in bufs_r.items():
        torch.testing.assert_close(bufs_t[name], b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("join", ("bn", "sum"))
def test_backward_reduce_hook_gets_the_local_sums(join):
    """A SyncBatchNorm unit's backward (``reduce``, tritonact.sync.all_reduce_sums): the hook sees this batch's
    per-channel sums and count between the two passes, the input gradient uses what it returns, gamma / beta
    gradients stay the local sums. Two identical ranks (sums and count doubled) leave every gradient as it was;
    kernel and reference agree."""
    need("cpu")
    y, r, gamma, beta, spec, _, got, _ = run_forward(CASES[0], "relu", join, 4, "cpu")
    out, data, P, invstd, _ = got
    shape = tuple(CASES[0][0])
    g = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    args = (data, P, 4, shape, memory_order(y), "relu", gamma, beta, invstd, r if join == "sum" else None, None)
    seen = []

    def twice(sum_gz, sum_gzxh, count):
        seen.append((sum_gz.clone(), sum_gzxh.clone(), count))
        return 2 * sum_gz, 2 * sum_gzxh, torch.tensor(2.0 * count, dtype=torch.float64)

    for fn in (ref.unit_backward_ref, KB.unit_backward):
        plain = fn(g, *args)
        seen.clear()
        synced = fn(g, *args, reduce=twice)
        ((sum_gz, sum_gzxh, count),) = seen
        assert count == math.prod(shape) // shape[1]
        exact(sum_gz, plain[2])
        exact(sum_gzxh, plain[1])
        for a, b in zip(synced, plain):
            if a is not None:
                exact(a, b)
        shifted = fn(g, *args, reduce=lambda s, sx, n: (s + 1.0, sx, n))  # the input gradient reads the result
        assert not torch.equal(shifted[0], plain[0])
        exact(shifted[2], plain[2])


@pytest.mark.parametrize("join", ("bn", "sum"))
def test_forward_with_given_statistics(join):
    """A SyncBatchNorm unit's forward (``stats``: the global batch's, tritonact.sync.global_stats): the unit
    normalizes with them, not with its own batch's, and returns the running statistics it is given; kernel and
    reference produce the same codes of the values they output."""
    need("cpu")
    shape = (2, 5, 6, 6)
    y, r, gamma, beta = make(shape, torch.float32, False, "cpu", 0, residual=join != "bn")
    g = torch.Generator().manual_seed(3)
    mean, var = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5
    invstd = (var.double() + 1e-5).rsqrt().float()
    new_rm, new_rv = torch.randn(5, generator=g), torch.rand(5, generator=g)
    stats = (mean, invstd, new_rm, new_rv, var)
    kw = dict(bits=4, act="relu", window=3.5, pf=0.75, store_xh=False, stats=stats)
    outs = [backends.get(b).bn_act(y, gamma, beta, r, None, None, 0.1, 1e-5, **kw) for b in ("triton", "torch")]
    z = (y - ref.bview(mean, y)) * ref.bview(invstd, y) * ref.bview(gamma, y) + ref.bview(beta, y)
    want = torch.relu(z if r is None else z + r)
    for out, _, _, inv, _, _, rm, rv in outs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # fp32 rounding of the same formula
        exact(inv, invstd)
        assert rm is new_rm and rv is new_rv
    if join == "bn":  # both code xh = (y - mean) * invstd, the same fp32 ops (a sum may differ in its last bit)
        exact(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=1e-4, atol=1e-5)  # grids (see check_forward)
