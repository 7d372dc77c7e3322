"""Values far outside a channel's distribution are stored exactly beside the code (``tritonact.outliers``)."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import tritonact
from tritonact import backends, escapes, fidelity, outliers, saved_codes
from tritonact import reference as ref


def with_outliers(seed=0, shape=(8, 4, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    w[0, :, 3, 3] = 100.0
    w[1, :, 5, 5] = -50.0
    return w


def plain_code(w, act, coded, gamma, beta):
    stats = ref.value_stats(w, coded)
    P = ref.code_params(bits=4, act=act, wmin=stats[0], wmax=stats[1], wmean=stats[2], wstd=stats[3], gamma=gamma,
                        beta=beta, coded=coded, window=3.5, positive_fraction=0.75)  # fmt: skip
    return ref.encode_ref(w, P, 4, act), P


def test_the_grid_flags_a_channel_with_a_value_beyond_eight_sigma_only():
    w = torch.randn(16, 2, 64, 64, generator=torch.Generator().manual_seed(1))  # 65,536 values per channel
    w[3, 1, 7, 7] = 40.0
    _, P = plain_code(w, "none", "sum", torch.ones(2), torch.zeros(2))
    assert P[ref.R["out"]].tolist() == [0.0, 1.0]
    assert outliers.flagged(P)
    assert not outliers.flagged(P[:, :1])


@pytest.mark.parametrize("act, coded", [("relu", "xh"), ("relu", "sum"), ("none", "xh"), ("relu6", "sum")])
def test_recode_keeps_the_outliers_exact_and_the_bulk_fine(act, coded):
    w = with_outliers()
    if coded == "xh":
        w = (w - w.mean((0, 2, 3), keepdim=True)) / w.std((0, 2, 3), keepdim=True, unbiased=False)
    gamma, beta = torch.tensor([1.0, -0.5, 2.0, 0.7]), torch.tensor([0.1, 0.0, -0.3, 0.2])
    data, P, esc = outliers.recode(w, bits=4, act=act, coded=coded, gamma=gamma, beta=beta,
                                   window=3.5, pf=0.75, cent=True)  # fmt: skip
    shape, perm = tuple(w.shape), (0, 1, 2, 3)
    dec, mask = ref.decode_value_ref(data, P, 4, shape, perm, act, esc=esc)
    idx = esc[:, 0].long()
    assert 8 <= len(idx) <= w.numel() // outliers.CAP
    assert set((w.flatten().abs() >= 40).nonzero().flatten().tolist()) <= set(idx.tolist())
    v = (w - ref.bview(P[ref.R["o"]], w)) * ref.bview(P[ref.R["sgn"]], w)
    exact_mask = (v > 0) & (v < ref.bview(P[ref.R["vhi"]], w))
    assert torch.equal(mask.flatten()[idx], exact_mask.flatten()[idx])
    if act != "relu6":
        assert torch.allclose(dec.flatten()[idx], w.flatten()[idx], rtol=1e-6, atol=1e-6)
    bulk = torch.ones(w.numel(), dtype=torch.bool)
    bulk[idx] = False
    pd, pP = plain_code(w, act, coded, gamma, beta)
    plain = ref.decode_value_ref(pd, pP, 4, shape, perm, act)[0]
    err = lambda d: ((d.flatten() - w.flatten())[bulk].norm() / w.flatten()[bulk].norm()).item()  # noqa: E731
    # measured: 0.13-0.19 against 0.34-0.51 (4 bits over a range that reaches 100 sigma, the outliers' own errors
    # left out); the bound halves the plain error
    assert err(dec) < 0.5 * err(plain), (err(dec), err(plain))


def test_escapes_follow_a_sample_range():
    w = with_outliers()
    data, P, esc = outliers.recode(w, bits=4, act="none", coded="sum", gamma=torch.ones(4),
                                   beta=torch.zeros(4), window=3.5, pf=0.75, cent=False)  # fmt: skip
    shape, perm = tuple(w.shape), (0, 1, 2, 3)
    full = ref.decode_value_ref(data, P, 4, shape, perm, "none", esc=esc)[0]
    per = w[0].numel() * 4 // 8
    part = ref.decode_value_ref(data[per : 2 * per], P, 4, (1, *shape[1:]), perm, "none",
                                esc=escapes.select(esc, 1, 2, shape, perm))[0]  # fmt: skip
    assert torch.equal(part, full[1:2])
    assert part[0, :, 5, 5].tolist() == [-50.0] * 4


@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("act, channels_last", [("relu", False), ("relu6", True), ("none", False)])
def test_backend_decode_puts_the_escaped_activations_back_like_the_reference(backend, act, channels_last):
    """A backend decodes a code with escapes by its own decoder and writes the escaped elements' activations over
    it (``escapes.apply_act_``): the reference's bytes, for the whole batch and for a sample range."""
    from tritonact import backends

    w = with_outliers()
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    gamma, beta = torch.tensor([1.0, -0.5, 2.0, 0.7]), torch.tensor([0.1, 0.0, -0.3, 0.2])
    data, P, esc = outliers.recode(w, bits=4, act=act, coded="sum", gamma=gamma, beta=beta, window=3.5, pf=0.75,
                                   cent=True)  # fmt: skip
    shape, perm = tuple(w.shape), tuple(ref.memory_order(w))
    code = backends.CodeRef(data, P, None, shape, perm, 4, act, esc=esc)
    want = ref.decode_act_ref(data, P, 4, shape, perm, act, torch.float32, esc=esc)
    got = backends.get(backend).decode(code, torch.float32)
    assert escapes.count(esc) >= 8 and torch.equal(got, want)
    if not channels_last:  # a sample range (the batch outermost in memory)
        assert torch.equal(backends.get(backend).decode(code, torch.float32, 1, 3), want[1:3])


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 3),
    )  # fmt: skip


def _grads(model, x, approx, **kw):
    model = copy.deepcopy(model)
    if approx:
        with tritonact.approximate(model, bits=4, **kw):
            model(x).square().sum().backward()
    else:
        model(x).square().sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if n.endswith("weight")}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_net_with_an_input_outlier_keeps_its_gradients(backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[0, :, 5, 5] = 100.0
    model = _net()
    exact = _grads(model, x, False)
    errs = {n: fidelity.rel_l2(g, exact[n]) for n, g in _grads(model, x, True, backend=backend).items()}
    monkeypatch.setattr(outliers, "flagged", lambda P: False)  # what the grids did before
    before = {n: fidelity.rel_l2(g, exact[n]) for n, g in _grads(model, x, True, backend=backend).items()}
    # measured (torch backend): first conv 0.28 against 1.02, first BN 0.16 against 1.03
    assert errs["0.weight"] < 0.5 * before["0.weight"], (errs, before)
    assert errs["1.weight"] < 0.5 * before["1.weight"], (errs, before)


def test_a_generic_code_escapes_its_outliers():
    w = with_outliers()
    c = saved_codes.encode(w, 4, 3.5, act="none")
    assert escapes.count(c.esc) >= 8
    assert c.nbytes >= c.esc.numel() * 8
    dec = c.decode()
    big = w.abs() >= 40
    assert torch.equal(dec[big], w[big])


def test_compiled_model_with_an_outlier_matches_the_eager_path():
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[0, :, 5, 5] = 100.0
    model = _net()
    eager = _grads(model, x, True, backend="torch")
    m = copy.deepcopy(model)
    with tritonact.approximate(m, bits=4, backend="torch"):
        torch.compile(m, backend="eager", fullgraph=True)(x).square().sum().backward()
    for n, p in m.named_parameters():
        if n in eager:
            assert torch.allclose(p.grad, eager[n], rtol=1e-5, atol=1e-6), n


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_one_outlier_pixel_stays_within_one_and_a_half_clean_errors(name):
    """One pixel of sample 0 set to k in every input channel (8 x 64x64, seed 0, conv weight gradient median /
    max, 4 bits). Measured, before escapes -> with them: resnet18 clean 0.098 / 0.140, k=100 0.284 / 0.659 -> 0.101 /
    0.142, k=1e4 0.444 / 0.779 -> 0.092 / 0.101; resnet50 clean 0.107 / 0.166, k=100 0.294 / 0.760 -> 0.125 / 0.179,
    k=1e4 0.523 / 0.852 -> 0.149 / 0.185. The bound is the issue's: 1.5x the clean median."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 64, 64, generator=g)
    t = torch.randint(0, 10, (8,), generator=g)
    med = {}
    for k in (0.0, 100.0, 1e4):
        xk = x.clone()
        if k:
            xk[0, :, 20, 20] = k
        med[k] = fidelity.summarize(fidelity.grad_errors(model, xk, t, bits=4, backend="torch")).median
    assert med[100.0] <= 1.5 * med[0.0] and med[1e4] <= 1.5 * med[0.0], med


def test_channels_last_escapes_like_nchw():
    """Escapes are indexed in memory order: a channels_last model gets the gradients of the NCHW one."""
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[0, :, 5, 5] = 100.0
    model = _net()
    nchw = _grads(model, x, True, backend="torch")
    cl = _grads(model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last), True,
                backend="torch")  # fmt: skip
    for n, g in nchw.items():  # fp32 sums in another order: rel ~2e-6 with or without escapes (measured)
        assert fidelity.rel_l2(cl[n], g) < 1e-5, (n, fidelity.rel_l2(cl[n], g))


class _Block(nn.Module):
    """conv-BN-ReLU, then a residual join (BN + add + ReLU) whose residual is the first unit's output."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        a = torch.relu(self.b1(self.c1(x)))
        return self.c3(torch.relu(self.b2(self.c2(a)) + a))


@pytest.mark.parametrize("join_codes", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_residual_join_with_an_input_outlier_keeps_its_gradients(backend, join_codes, monkeypatch):
    """The join's code, its residual's code and (join_codes=2) its second code all escape their outliers. Measured
    (torch backend): every weight gradient 0.002-0.008 with escapes, 0.18-0.41 without (the outlier's own
    positions, now exact, carry most of the gradient)."""
    if backend == "triton":
        pytest.importorskip("triton")
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[0, :, 5, 5] = 100.0
    torch.manual_seed(0)
    model = _Block()
    exact = _grads(model, x, False)
    kw = dict(backend=backend, join_codes=join_codes)
    errs = {n: fidelity.rel_l2(g, exact[n]) for n, g in _grads(model, x, True, **kw).items()}
    monkeypatch.setattr(outliers, "flagged", lambda P: False)
    before = {n: fidelity.rel_l2(g, exact[n]) for n, g in _grads(model, x, True, **kw).items()}
    for n in ("c1.weight", "b1.weight", "c2.weight", "b2.weight"):
        assert errs[n] < 0.5 * before[n], (n, errs, before)


def test_recode_of_a_large_batch_takes_its_statistics_from_the_first_samples(monkeypatch):
    """Past ``ROBUST_VALUES`` values per channel the robust statistics see the first samples only (here 2 of 8), the
    escapes every sample: an outlier in the last sample is still escaped exactly. The compiled ``encode`` measures
    its table over the same samples as the reference (equal codes and grids)."""
    monkeypatch.setattr(outliers, "ROBUST_VALUES", 2 * 16 * 16)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 4, 16, 16, generator=g)
    w[7, 2, 5, 5] = 500.0
    assert outliers.leading(tuple(w.shape), (0, 1, 2, 3), outliers.ROBUST_VALUES) == 2
    kw = dict(bits=4, act="none", coded="sum", gamma=torch.ones(4), beta=torch.zeros(4), window=3.5, pf=0.75,
              cent=True)  # fmt: skip
    data, P, esc = outliers.recode(w, **kw)
    at = int(((7 * 4 + 2) * 16 + 5) * 16 + 5)
    assert at in esc[:, 0].long().tolist()
    dec = ref.decode_value_ref(data, P, 4, tuple(w.shape), (0, 1, 2, 3), "none", esc=esc)[0]
    assert dec.flatten()[at].item() == 500.0
    # the grid comes from the first two samples: scaling the others (their range beyond the window either way)
    # leaves it as it is
    grids = []
    for k in (3.0, 4.0):
        wk = w.clone()
        wk[2:] *= k
        grids.append(outliers.recode(wk, **kw)[1][: ref.PARAM_ROWS])
    assert torch.equal(grids[0], grids[1])
    compiled_be = backends.get("compiled")
    if compiled_be.available(torch.device("cpu")):
        data_c, P_c, esc_c = outliers.recode(w, **{**kw, "encode": compiled_be.encode})
        assert torch.equal(data_c, data) and torch.equal(P_c, P) and torch.equal(esc_c, esc)


def _escaped_unit(mode, act, channels_last, seed=0, shape=(8, 4, 16, 16)):
    """A unit's backward arguments (``ops.bn_act._bn_act_backward``'s) whose codes all have escaped values."""
    g = torch.Generator().manual_seed(seed)

    def t(scale=1.0):
        x = with_outliers(seed, shape) * scale + torch.randn(shape, generator=g) * 0.1
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    C = shape[1]
    gamma, beta = torch.tensor([1.0, -0.5, 2.0, 0.7]), torch.tensor([0.1, 0.0, -0.3, 0.2])
    kw = dict(bits=4, gamma=gamma, beta=beta, window=3.5, pf=0.75, cent=True)
    coded = "xh" if mode == "plain" else "sum"
    data, P, esc = outliers.recode(t(), act=act, coded=coded, **kw)
    a = dict(data=data, P=P, gamma=gamma, beta=beta, invstd=torch.rand(C, generator=g) + 0.5, xdata=None, xP=None,
             residual=None, res_data=None, res_P=None, res_local=None, res_shape=[], res_perm=[], res_pool=[],
             res_act="", esc=esc, xesc=None, res_esc=None)  # fmt: skip
    if mode == "residual":
        a["residual"] = t(0.5)
    elif mode == "rcode":
        a["res_data"], a["res_P"], a["res_esc"] = outliers.recode(t(0.5), act="relu", coded="sum", **kw)
        a.update(res_shape=list(shape), res_perm=list(ref.memory_order(t())), res_act="relu")
    elif mode == "xh":
        a["xdata"], a["xP"], a["xesc"] = outliers.recode(t(2.0), act="none", coded="xh", **kw)
    perm = list(ref.memory_order(t()))
    a.update(shape=list(shape), perm=perm, bits=4, act=act, dtype=torch.float32, res_dtype=torch.float32)
    return t(0.3), a


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    "mode, act, channels_last",
    [("plain", "relu", False), ("plain", "relu6", True), ("plain", "none", False), ("residual", "relu", False),
     ("rcode", "relu", False), ("rcode", "relu", True), ("xh", "relu", False), ("xh", "relu6", True)],
)  # fmt: skip
def test_the_compiled_backward_of_escaped_codes_equals_the_reference(mode, act, channels_last, inplace, monkeypatch):
    """Codes with escapes run the compiled backward with the escaped elements' share added to its sums and their
    gradients written over (``tritonact.escaped``), not the torch reference: the same gradients (fp32 sums in
    another order: at most 8.4e-7 of each output's largest value over these cases, measured)."""
    import importlib

    ob = importlib.import_module("tritonact.ops.bn_act")

    if not backends.get("compiled").available(torch.device("cpu")):
        pytest.skip("no compiled CPU path")
    g, a = _escaped_unit(mode, act, channels_last)
    assert all(escapes.count(a[k]) >= 8 for k in ("esc", "xesc", "res_esc") if a[k] is not None)
    want = ob._bn_act_backward(g.clone(), **a, backend="torch")
    monkeypatch.setattr(ref, "unit_backward_ref", None)  # the compiled path must not fall back to it
    got = ob._bn_act_backward(g.clone(), **a, backend="compiled", inplace=inplace)
    for name, w_, g_ in zip(("g_y", "g_gamma", "g_beta", "g_res"), want, got):
        assert w_.shape == g_.shape, name
        if not w_.numel():
            continue
        scale = w_.abs().max().clamp(min=1e-6)
        assert ((g_ - w_).abs().max() / scale).item() < 1e-5, (name, ((g_ - w_).abs().max() / scale).item())


@pytest.mark.parametrize("coded", ["xh", "sum"])
@pytest.mark.parametrize("channels_last, head, hw", [(False, 8, 16), (False, 3, 16), (True, 8, 16), (False, 8, 2)])
def test_compiled_robust_statistics_equal_the_reference(coded, channels_last, head, hw):
    """The recode's statistics as one compiled graph: the reference's up to the order of the fp32 sums (measured:
    within 9.4e-7 relative), over the whole batch or its first samples (the range always over every sample)."""
    be = backends.get("compiled")
    if not be.available(torch.device("cpu")):
        pytest.skip("no compiled CPU path")
    w = torch.randn(8, 4, hw, hw, generator=torch.Generator().manual_seed(2)) * 1.5 + 0.3
    w[0, :, 1, 1], w[1, :, 0, 1] = 100.0, -50.0
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    w[7, 1, 1, 0] = 500.0  # outside the head: only the range sees it
    want = outliers.robust_stats_ref(w, w[:head], coded)
    got = be.robust_stats(w, w[:head], coded)
    for name, a, b in zip(("min", "max", "mean", "std"), got, want):
        assert torch.allclose(a, b, rtol=2e-6, atol=1e-6), (name, a, b)
    assert got[1][1].item() == 500.0


def test_a_recode_escapes_at_most_one_value_in_cap_the_furthest_out(monkeypatch):
    """More values outside the escape bounds than one per ``CAP`` (a whole sample far out, the statistics from the
    clean first samples): ``numel / CAP`` of them are escaped (the furthest out in their channel's window units), the
    others coded on the grid (clipped into the end bin, not left as NaN), on both encoders alike."""
    monkeypatch.setattr(outliers, "ROBUST_VALUES", 2 * 16 * 16)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, 16, 16, generator=g)
    w[7] = 50.0 + torch.rand(4, 16, 16, generator=g)
    kw = dict(bits=4, act="none", coded="sum", gamma=torch.ones(4), beta=torch.zeros(4), window=3.5, pf=0.75,
              cent=True)  # fmt: skip
    data, P, esc = outliers.recode(w, **kw)
    cap = w.numel() // outliers.CAP
    assert esc.shape[0] == cap
    per = w[0].numel()
    assert (esc[:, 0] >= 7 * per).all() and torch.equal(esc[:, 1], w.flatten()[esc[:, 0].long()].double())
    dec = ref.decode_value_ref(data, P, 4, tuple(w.shape), (0, 1, 2, 3), "none", esc=esc)[0]
    kept = torch.ones(w.numel(), dtype=torch.bool)
    kept[esc[:, 0].long()] = False
    top = dec.flatten()[kept].view(-1)[-(w[7].numel() - cap) :]  # sample 7's values that were not escaped
    assert torch.isfinite(dec).all() and (top > 3.0).all()  # the end bin
    compiled_be = backends.get("compiled")
    if compiled_be.available(torch.device("cpu")):
        got = outliers.recode(w, **kw, encode=compiled_be.encode)
        assert all(torch.equal(a, b) for a, b in zip(got, (data, P, esc)))


def test_an_escaped_backward_the_compiled_path_declines_runs_the_reference_on_the_given_gradient():
    """A shape the compiled graphs do not take (3 x 4 x 7 x 7: 588 codes, not a multiple of 8 at 4 bits) falls back
    to the reference, which must see the gradient as it came in (the fast path zeroes it at the escaped elements
    first): the reference's results bit for bit, in place too."""
    import importlib

    ob = importlib.import_module("tritonact.ops.bn_act")
    from tritonact import compiled

    g, a = _escaped_unit("plain", "relu", False, shape=(3, 4, 7, 7))
    assert compiled.layout3(tuple(a["shape"]), tuple(a["perm"]), 4) is None and escapes.count(a["esc"]) >= 4
    want = ob._bn_act_backward(g.clone(), **a, backend="torch")
    got = ob._bn_act_backward(g.clone(), **a, backend="compiled", inplace=True)
    for w_, g_ in zip(want, got):
        assert torch.equal(w_, g_)
