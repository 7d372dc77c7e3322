"""``tritonact::stem``: a convolution of the network's input, its unit and the max-pool after it, whose backward
computes the BN input again instead of keeping the unit's code, and whose pool output carries a code of its own."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tritonact
from tritonact import backends, pool_index
from tritonact import reference as ref
from tritonact.ops.stem import pool_code
from tritonact.quant import memory_order
from tritonact.rewrite import plan as plan_mod

stem_ops = sys.modules["tritonact.ops.stem"]  # (tritonact.ops.stem the name is the op)


def _grads(model, x, t, mode, bits=4, monkeypatch=None, **kw):
    m = copy.deepcopy(model)
    if mode == "exact":
        F.cross_entropy(m(x), t).backward()
    else:
        if mode == "no stem":
            monkeypatch.setattr(plan_mod, "_find_stems", lambda *a: None)
        with tritonact.approximate(m, bits=bits, **kw) as ctx:
            F.cross_entropy(m(x), t).backward()
            stems = [n for _, rw in ctx._rewritten for n, c in rw.gm.named_children() if type(c).__name__ == "Stem"]
        monkeypatch.undo()
        assert stems == ([] if mode == "no stem" else ["tritonact_stem_bn1"])
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    return grads, {n: b.clone() for n, b in m.named_buffers()}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("bits,outlier", [(2, False), (4, False), (4, True)])
def test_stem_leaves_every_later_gradient_bit_identical_and_its_own_exact(bits, outlier, monkeypatch):
    """Everything after the pool reads the pool output's own code, which decodes to the values the unit's code
    gathered at the argmax decodes to: bit-identical gradients. The stem's own (conv1, bn1) are computed from the
    exact BN input now, so the BN's gradient error falls. ``outlier``: an input pixel far out gives the stem's code
    escaped values (tritonact.outliers), which the pool output's code keeps where the argmax took them."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    x, t = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,))
    if outlier:
        x[1, :, 20:23, 30:33] = 200.0
    exact, exact_buf = _grads(model, x, t, "exact")
    old, old_buf = _grads(model, x, t, "no stem", bits, monkeypatch)
    escaped = []

    def counting(data, esc, *args):
        escaped.append(esc.shape[0])
        return pool_code(data, esc, *args)

    monkeypatch.setattr(stem_ops, "pool_code", counting)
    new, new_buf = _grads(model, x, t, "stem", bits, monkeypatch)
    assert (escaped[0] > 0) == outlier
    stem_params = {"conv1.weight", "bn1.weight", "bn1.bias"}
    assert all(torch.equal(old[n], new[n]) for n in old if n not in stem_params)
    if not outlier:  # (with one, the error of the gradient that reaches the pool dominates: 0.1151 -> 0.1149)
        assert _rel(new["bn1.weight"], exact["bn1.weight"]) < 0.7 * _rel(old["bn1.weight"], exact["bn1.weight"])
    assert all(torch.equal(new_buf[k], old_buf[k]) and torch.equal(new_buf[k], exact_buf[k]) for k in new_buf)


class _StemNet(nn.Module):
    def __init__(self, size=32, act=F.relu):
        super().__init__()
        self.act = act
        self.conv = nn.Conv2d(3, 16, 5, stride=2, padding=2, bias=True)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Linear(16 * (size // 4) ** 2, 10)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("variant", ["relu", "relu6", "negative-gamma", "negative-gamma-relu6"])
def test_a_stem_whose_pool_output_is_kept_exactly_trains_exactly(channels_last, chunked, variant, monkeypatch):
    """Nothing but the stem is approximate (the linear layer keeps the pool's output: ``generic=False``): every
    gradient equals the exact model's to float rounding, where the stem without recomputation is 2-bit coarse.
    ``chunked``: the backward works through the batch a sample at a time (16 x 16 x 16 values per sample).
    ``variant``: the activation, and some channels' gamma negative (the activation's test on the normalized input
    flips there; without any, the backward takes a shorter test)."""
    if chunked:
        monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 16 * 16 * 16)
    torch.manual_seed(1)
    model = _StemNet(act=F.relu6 if variant.endswith("relu6") else F.relu)
    with torch.no_grad():
        if variant.startswith("negative"):
            model.bn.weight[::3] = -0.5
        model.bn.weight.mul_(3.0)  # (values past 6 for relu6)
        model.bn.bias.uniform_(-1.0, 1.0)
    x, t = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def run(stem):
        m = copy.deepcopy(model)
        with monkeypatch.context() as mp:
            if not stem:
                mp.setattr(plan_mod, "_find_stems", lambda *a: None)
            with tritonact.approximate(m, bits=2, generic=False):
                F.cross_entropy(m(x), t).backward()
        return {n: p.grad for n, p in m.named_parameters()}, m

    ref_m = copy.deepcopy(model)
    F.cross_entropy(ref_m(x), t).backward()
    (new, m_new), (old, _) = run(True), run(False)
    for n, p in ref_m.named_parameters():
        if n == "conv.bias":  # zero but for rounding (the BN subtracts it again): both within rounding of 0
            assert (new[n] - p.grad).abs().max() < 1e-6 * ref_m.conv.weight.grad.abs().max()
            continue
        # fp32 sums over 2048 values per channel in another order (the BN's): a few ulps of the gradient's norm
        assert _rel(new[n], p.grad) < 1e-5, n
    assert _rel(old["bn.weight"], ref_m.bn.weight.grad) > 1e-2  # (the test can tell the two apart)
    assert torch.equal(m_new.bn.running_mean, ref_m.bn.running_mean)
    assert torch.equal(m_new.bn.num_batches_tracked, ref_m.bn.num_batches_tracked)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("escaped", [False, True])
def test_pool_code_decodes_to_the_gathered_unit_code(channels_last, escaped):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 5, 9, 11, generator=g) * 2 + 0.5
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    C, bits, be = y.shape[1], 4, backends.get("torch")
    gamma, beta = torch.randn(C, generator=g), torch.randn(C, generator=g)
    a, data, P, *_ = be.bn_act(y, gamma, beta, None, None, None, 0.1, 1e-5, bits=bits, act="relu", window=3.5,
                               pf=0.75, store_xh=False)  # fmt: skip
    perm = memory_order(y)
    esc = None
    if escaped:  # exact values for a few elements, as tritonact.outliers keeps them
        at = torch.randperm(y.numel(), generator=g)[:40].double()
        esc = torch.stack([at, torch.randn(40, generator=g, dtype=torch.float64) * 5], 1)
    out, idx = F.max_pool2d(a, 3, 2, 1, return_indices=True)
    local = ref.local_index(idx, tuple(y.shape), [3, 3], [2, 2], [1, 1], [1, 1])
    geom = (3, 3, 2, 2, 1, 1, 1, 1, *out.shape[-2:])
    kept = pool_index.pack_local(local, [3, 3])
    full = backends.CodeRef(data, P, kept, tuple(y.shape), perm, bits, "relu", geom, esc)
    pdata, pesc = pool_code(data, esc if escaped else ref_none(y), idx, tuple(y.shape), perm, out, bits)
    assert pdata.numel() == (out.numel() * bits + 7) // 8
    own = backends.CodeRef(pdata, P, None, tuple(out.shape), memory_order(out), bits, "relu", (), pesc)
    want, got = be.decode(full, torch.float32), be.decode(own, torch.float32)
    assert torch.equal(got, want)
    if escaped:
        assert 0 < pesc.shape[0] <= 40


def ref_none(like):
    return like.new_empty((0, 2), dtype=torch.float64)


def test_stem_op_passes_opcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 20, 20)
    w = torch.randn(8, 3, 3, 3, requires_grad=True)
    gamma, beta = torch.rand(8, requires_grad=True), torch.randn(8, requires_grad=True)
    args = (x, w, None, [2, 2], [1, 1], [1, 1], 1, gamma, beta, torch.zeros(8), torch.ones(8), torch.tensor(0),
            0.1, 1e-5, [3, 3], [2, 2], [1, 1], [1, 1], False, 4, "relu", 3.5, 0.75, "torch")  # fmt: skip
    torch.library.opcheck(torch.ops.tritonact.stem.default, args, test_utils=("test_schema", "test_faketensor"))


def test_stem_double_backward_raises_a_clear_error():
    model = _StemNet()
    x = torch.randn(4, 3, 32, 32)
    with tritonact.approximate(model, bits=4, generic=False):
        loss = model(x).square().mean()
        with pytest.raises(RuntimeError, match="tritonact: double backward"):
            torch.autograd.grad(loss, model.conv.weight, create_graph=True)


def test_stem_on_the_triton_backend():
    """The unit inside ``tritonact::stem`` on the Triton kernels (the interpreter on CPU): the reference's gradients
    to the rounding of BN's formula (the two backends' statistics differ in their last bits)."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    base = _StemNet(16)
    x, t = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    got = {}
    for backend in ("torch", "triton"):
        m = copy.deepcopy(base)
        with tritonact.approximate(m, bits=4, backend=backend, generic=False) as ctx:
            F.cross_entropy(m(x), t).backward()
            ((_, gm),) = ctx.report().graph_modules
        assert "tritonact_stem_bn" in gm.code
        got[backend] = {n: p.grad for n, p in m.named_parameters()}
    for n, g in got["torch"].items():
        if n != "conv.bias":  # (zero but for rounding)
            assert _rel(got["triton"][n], g) < 1e-4, n


def test_the_stem_backward_traces_under_torch_compile():
    """torch.compile traces the stem's backward (AOT autograd) with tensors that have no values: the backward's
    sign test on gamma must not ask for them (it raised GuardOnDataDependentSymNode). The compiled step gives the
    eager approximate path's gradients."""
    from tritonact.fidelity import rel_l2

    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    eager, model = copy.deepcopy(base), copy.deepcopy(base)
    with tritonact.approximate(eager, bits=4):
        eager(x).square().mean().backward()
    torch._dynamo.reset()
    with tritonact.approximate(model, bits=4):
        torch.compile(model, fullgraph=True, backend="aot_eager")(x).square().mean().backward()
    assert rel_l2(model.conv1.weight.grad, eager.conv1.weight.grad) <= 1e-5  # the stem's own weight
    assert rel_l2(model.bn1.weight.grad, eager.bn1.weight.grad) <= 1e-5
