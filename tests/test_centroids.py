"""Centroid decoding (tritonact.centroids): each code decodes to the mean of the values that produced it, the same
table on every backend, and lower gradient error than midpoint decoding on real models."""

import math

import pytest
import torch
import torchvision

from tritonact import centroids, compiled
from tritonact import reference as ref
from tritonact.config import ApproxConfig
from tritonact.fidelity import exact_run, grad_errors, summarize
from tritonact.quant import interpreter_enabled, memory_order, unpack_codes


def _grid(w, bits, act, window=3.5, coded="xh"):
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)  # the grid of the finite values
    dims = ref.channel_dims(w)
    C = w.shape[1]
    return ref.code_params(
        bits=bits, act=act, wmin=w.amin(dim=dims), wmax=w.amax(dim=dims), wmean=w.mean(dim=dims),
        wstd=w.std(dim=dims, unbiased=False), gamma=torch.linspace(0.5, 2.0, C), beta=torch.linspace(-0.5, 0.5, C),
        coded=coded, window=window, positive_fraction=0.75, centroids=True,
    )  # fmt: skip


def _encoded(w, bits, act, n=None, **kw):
    P = _grid(w, bits, act, **kw)
    acc = centroids.new_acc(bits, w.shape[1], w.device)
    data = ref.encode_ref(w, P, bits, act, acc, n)
    return data, centroids.finish_(P, acc, ref.PARAM_ROWS)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act", ["relu", "relu6", "none"])
def test_each_code_decodes_to_the_mean_of_its_values(bits, act):
    """Decoded value of every (channel, code) == mean of the coded values that got that code, clipped tails
    included (within the fixed point, 2**-13 of a bin, plus fp32 rounding of the decode)."""
    torch.manual_seed(0)
    w = torch.randn(6, 3, 9, 9) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 0.2
    w[0, 1, 0, :3] = torch.tensor([40.0, -35.0, 25.0])  # outliers: clipped into the end bins (window 3.5)
    data, P = _encoded(w, bits, act)
    wt, _ = ref.decode_value_ref(data, P, bits, tuple(w.shape), (0, 1, 2, 3), act)
    q = unpack_codes(data, bits, w.numel()).view(w.shape).long()
    p = {k: P[ref.R[k]].view(1, -1, 1, 1) for k in ref.ROWS}
    sat = (q > p["qtop"]) if act == "relu6" else torch.zeros_like(q, dtype=torch.bool)
    step = torch.where(q >= p["nneg"], p["dp"], p["dn"]).expand(w.shape)
    checked = 0
    for c in range(w.shape[1]):
        for k in q[:, c].unique().tolist():
            sel = (q[:, c] == k) & ~sat[:, c]
            if not sel.any():
                continue
            want = w[:, c][sel].double().mean()
            got = wt[:, c][sel]
            assert (got == got[0]).all()  # one value per code
            tol = float(step[:, c][sel][0]) * 2**-12 + 4e-6 * max(1.0, abs(float(want)))
            assert abs(float(got[0]) - float(want)) <= tol, (c, k, float(got[0]), float(want))
            checked += 1
    assert checked > 3 * (1 << bits) // 2
    if bits == 8:  # the clipped outliers have the end bins to themselves: their centroids leave the bins
        assert ((P[ref.PARAM_ROWS :] > 1) | (P[ref.PARAM_ROWS :] < 0)).any()


def test_midpoint_table_decodes_like_no_table():
    torch.manual_seed(1)
    w = torch.randn(2, 4, 5, 5)
    P = _grid(w, 4, "relu")
    data = ref.encode_ref(w, P, 4, "relu")
    with_table = ref.decode_value_ref(data, P, 4, tuple(w.shape), (0, 1, 2, 3), "relu")[0]
    without = ref.decode_value_ref(data, P[: ref.PARAM_ROWS].clone(), 4, tuple(w.shape), (0, 1, 2, 3), "relu")[0]
    assert torch.equal(with_table, without)  # all rows 0.5 (nothing measured): exactly the midpoint decode


def test_statistics_see_the_first_samples_only(monkeypatch):
    monkeypatch.setitem(centroids.VALUES, 4, 2 * 25)  # two samples of 5x5 per channel
    torch.manual_seed(2)
    w = torch.randn(6, 3, 5, 5)
    assert centroids.sample_limit(tuple(w.shape), (0, 1, 2, 3), 4) == 2
    assert centroids.sample_limit(tuple(w.shape), (1, 0, 2, 3), 4) == 6  # batch not outermost: every sample
    data, P = _encoded(w, 4, "relu", n=2)
    w2 = w.clone()
    w2[2:] = w2[2:] * 0.7 + 0.1  # other values in the later samples: the table does not change ...
    acc = centroids.new_acc(4, 3, "cpu")
    P2 = P.clone()
    P2[ref.PARAM_ROWS :] = 0.5
    ref.encode_ref(w2, P2, 4, "relu", acc, 2)
    centroids.finish_(P2, acc, ref.PARAM_ROWS)
    assert torch.equal(P, P2)
    acc.zero_()
    ref.encode_ref(w2, P2, 4, "relu", acc)  # ... but with all samples it does
    assert not torch.equal(centroids.finish_(P2, acc, ref.PARAM_ROWS), P)


@pytest.mark.skipif(not compiled.enabled(torch.device("cpu")), reason="compiled CPU path off")
# each case compiles two graphs (a few seconds each on 2 cores): the widths, the other activations and channels_last
# once each
@pytest.mark.parametrize(
    "bits,act,cl", [(2, "relu", False), (4, "relu", False), (8, "relu", False), (4, "relu6", True), (4, "none", True)]
)
def test_compiled_table_and_decode_equal_the_reference(bits, act, cl):
    """From the same grid the compiled path measures the reference's table bit for bit (integer sums in any
    order), and decodes with it bit for bit."""
    torch.manual_seed(3)
    w = torch.randn(4, 8, 8, 8) * 2 + 0.3
    w[1, 2, 3, 0], w[1, 2, 3, 1] = float("nan"), float("inf")
    if cl:
        w = w.contiguous(memory_format=torch.channels_last)
    perm = memory_order(w)
    data, P = _encoded(w, bits, act, coded="sum", window=3.0)
    P_c = P.clone()
    P_c[ref.PARAM_ROWS :] = 0.5
    one = torch.ones(8)
    compiled._measure(P_c, w, perm, bits, "sum", act, one, one)
    assert torch.equal(P_c, P)
    a = compiled.decode_act(data, P, bits, tuple(w.shape), perm, act, torch.float32)
    assert a is not None
    assert torch.equal(a, ref.decode_act_ref(data, P, bits, tuple(w.shape), perm, act, torch.float32))
    # the backward graph reads the table as the reference does (in NCHW from compiled.graph_params' (C, L) copy)
    g = torch.randn(w.shape).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    args = (bits, tuple(w.shape), perm, act, one, one * 0.1, one)
    out = compiled.unit_backward(g, data, P, *args)
    want = ref.unit_backward_ref(g, data, P, *args)
    assert out is not None
    for c, e in zip(out[:3], want[:3]):  # the same values; per-channel sums in another order (fp32: ~1e-6)
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    mid = ref.unit_backward_ref(g, data, P[: ref.PARAM_ROWS].clone(), *args)
    assert not torch.allclose(out[0], mid[0], rtol=1e-3, atol=1e-3)  # and the table changed the result


@pytest.mark.skipif(not compiled.enabled(torch.device("cpu")), reason="compiled CPU path off")
@pytest.mark.parametrize("rows", [127, 130])
def test_compiled_sums_and_counts_stay_exact_at_the_packing_bound(rows):
    """The compiled statistics count with the sums in one weighted bincount (``f + COUNT_UNIT``) while a channel has
    at most ``PACKED_VALUES`` values, and apart beyond. Channel 0 is all clipped into the top bin at the largest
    offset (f = 2**24): 127 x 128 values are the most the packed sums hold, and 130 x 128 would overflow them."""
    assert 127 * 128 <= compiled.PACKED_VALUES < 130 * 128
    torch.manual_seed(5)
    w0 = torch.randn(1, 2, rows, 128)
    P = _grid(w0, 4, "relu", window=3.0)
    w = w0.clone()
    w[0, 0] = 1e9
    acc = centroids.new_acc(4, 2, w.device)
    ref.encode_ref(w, P, 4, "relu", acc)
    assert acc[0].max() == rows * 128 * 2.0**24  # every value of channel 0 in one bin, at the largest offset
    want = centroids.finish_(P.clone(), acc, ref.PARAM_ROWS)
    P_c = P.clone()
    P_c[ref.PARAM_ROWS :] = 0.5
    one = torch.ones(2)
    compiled._measure(P_c, w, (0, 1, 2, 3), 4, "sum", "relu", one, one)
    assert torch.equal(P_c, want)


def test_compiled_statistics_of_no_samples_leave_midpoints():
    """An empty batch: no graph runs, and every code decodes to its bin's midpoint (offset 0.5)."""
    w = torch.randn(0, 8, 4, 4)
    P = _grid(torch.randn(2, 8, 4, 4), 4, "relu")
    P[ref.PARAM_ROWS :] = 0.25
    one = torch.ones(8)
    compiled._measure(P, w, (0, 1, 2, 3), 4, "sum", "relu", one, one)
    assert torch.equal(P[ref.PARAM_ROWS :], torch.full_like(P[ref.PARAM_ROWS :], 0.5))


@pytest.mark.skipif(not compiled.enabled(torch.device("cpu")), reason="compiled CPU path off")
def test_compiled_statistics_add_up_over_sample_chunks():
    """Statistics over more samples than one graph call takes (``reference.sample_chunks``: 2 + 1 samples here)
    add up to the reference's table."""
    torch.manual_seed(6)
    w = torch.randn(3, 512, 32, 32) * 2
    assert len(list(ref.sample_chunks(tuple(w.shape), (0, 1, 2, 3), 8))) == 2
    P = _grid(w, 4, "relu", window=3.0)
    acc = centroids.new_acc(4, 512, w.device)
    ref.encode_ref(w, P, 4, "relu", acc, 3)
    want = centroids.finish_(P.clone(), acc, ref.PARAM_ROWS)
    P_c = P.clone()
    P_c[ref.PARAM_ROWS :] = 0.5
    one = torch.ones(512)
    compiled._measure(P_c, w, (0, 1, 2, 3), 4, "sum", "relu", one, one, samples=3)
    assert torch.equal(P_c, want)


@pytest.mark.skipif(not interpreter_enabled(), reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act", ["relu", "relu6", "none"])
@pytest.mark.parametrize("join", ["bn", "sum", "sum+xh"])
def test_triton_table_bit_identical(bits, act, join):
    """The forward kernel's atomics give the reference's table bit for bit (given the same grid), and the decode and
    backward kernels read it as the reference does; NaN and inf inputs do not count."""
    from tritonact.kernels import bn_act as K
    from tritonact.kernels import bn_act_bwd as KB

    torch.manual_seed(4)
    shape = (3, 5, 4, 6)
    y = torch.randn(shape) * 2
    y.view(-1)[::37] = float("nan")
    y.view(-1)[5::41] = float("inf")
    y = y.contiguous(memory_format=torch.channels_last)
    r = torch.randn(shape).contiguous(memory_format=torch.channels_last) if join != "bn" else None
    C = shape[1]
    mean, invstd = torch.linspace(-0.3, 0.3, C), torch.full((C,), 0.8)
    gamma, beta = torch.linspace(-1.0, 2.0, C), torch.linspace(-0.5, 0.5, C)
    xh = (y - ref.bview(mean, y)) * ref.bview(invstd, y)
    w = xh if r is None else ((xh * ref.bview(gamma, y) + ref.bview(beta, y)) + r)
    fin = torch.isfinite(w)
    kw = dict(bits=bits, gamma=gamma, beta=beta, window=3.0, positive_fraction=0.75, centroids=True)
    stats = dict(wmin=torch.where(fin, w, math.inf).amin(dim=(0, 2, 3)), wmax=torch.where(fin, w, -math.inf).amax(
        dim=(0, 2, 3)), wmean=torch.zeros(C), wstd=torch.ones(C) * 2)  # fmt: skip
    P = ref.code_params(act=act, coded="xh" if r is None else "sum", **stats, **kw)
    xP = ref.code_params(act="none", coded="xh", **stats, **kw) if join == "sum+xh" else None
    P_ref, xP_ref = P.clone(), (xP.clone() if xP is not None else None)
    out, data, xdata = K.bn_act_forward(y, r, mean, invstd, gamma, beta, P, xP, bits, act)
    acc = centroids.new_acc(bits, C, "cpu")
    assert torch.equal(data, ref.encode_ref(w, P_ref, bits, act, acc))
    assert torch.equal(P, centroids.finish_(P_ref, acc, ref.PARAM_ROWS))
    assert not torch.equal(P[ref.PARAM_ROWS :], torch.full_like(P[ref.PARAM_ROWS :], 0.5))
    if xP is not None:
        acc.zero_()
        ref.encode_ref(xh, xP_ref, bits, "none", acc)
        assert torch.equal(xP, centroids.finish_(xP_ref, acc, ref.PARAM_ROWS))
    perm = memory_order(y)
    got = K.decode_act(data, P, bits, shape, perm, act, torch.float32)
    assert torch.equal(got, ref.decode_act_ref(data, P, bits, shape, perm, act, torch.float32))
    v, m = K.decode_value(data, P, bits, shape, perm, act)
    v_t, m_t = ref.decode_value_ref(data, P, bits, shape, perm, act)
    torch.testing.assert_close(v, v_t, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(m, m_t)
    g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    ga, gb = gamma, beta
    res = r if join == "sum" else None
    xc = (xdata, xP) if xP is not None else None
    got = KB.unit_backward(g, data, P, bits, shape, perm, act, ga, gb, invstd, res, xc)
    want = ref.unit_backward_ref(g, data, P, bits, shape, perm, act, ga, gb, invstd, res, xc)
    for a, b in zip(got[:3], want[:3]):  # sums in another order: fp32 reduction tolerance
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_centroids_lower_the_error_on_resnet18():
    """The reason for the table: on torchvision resnet18 (8 samples of 64x64, at init) centroid decoding beats the
    midpoint at every width (measured 3 seeds: 0.0067 -> 0.0044, 0.109 -> 0.097, 0.371 -> 0.351), the forward
    stays exact, and every gradient is finite."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, t = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    ex = exact_run(model, x, t)
    for bits in (8, 4, 2):
        mid = grad_errors(model, x, t, bits=bits, exact=ex, decode="midpoint")
        cen = grad_errors(model, x, t, bits=bits, exact=ex, decode="centroid")
        assert cen.output_rel_diff == 0.0 and cen.loss_rel_diff == 0.0
        assert all(math.isfinite(e) for e in cen.errors)
        assert summarize(cen).median < 0.95 * summarize(mid).median, (bits, summarize(cen), summarize(mid))


def test_decode_option_is_checked():
    with pytest.raises(ValueError, match="decode must be 'auto', 'centroid' or 'midpoint'"):
        ApproxConfig(decode="mean")
    cfg = ApproxConfig()
    assert cfg.decode == "auto" and cfg.centroids(4) and cfg.centroids(2) and not cfg.centroids(8)
    assert ApproxConfig(decode="centroid").centroids(8) and not ApproxConfig(decode="midpoint").centroids(4)
