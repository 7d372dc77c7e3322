"""The compiled CPU path (tritonact.compiled) against the eager reference it is compiled from.

Each case costs a few seconds of compilation, so the cases are a representative few (every bit width, activation
and memory format appears at least once) rather than the full product.
"""

import math
import warnings

import pytest
import torch
import torchvision

import tritonact
from tritonact import compiled, graphs
from tritonact import reference as ref
from tritonact.config import ApproxConfig
from tritonact.quant import memory_order

CASES = [  # bits, act, channels_last
    (4, "relu", False),
    (4, "relu", True),
    (2, "relu6", False),
    (8, "none", True),
]


@pytest.fixture(autouse=True)
def _compiled_path_must_run():
    yield
    assert compiled._failed is None, f"compilation fell back to eager: {compiled._failed}"


def _unit_inputs(bits, channels_last, seed=0, shape=(4, 16, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=g) * 2 + 0.5
    y[0, 1] = 0.25  # a constant channel slice, and exact ties at bin edges below
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    gamma = torch.randn(C, generator=g)
    gamma[3] = 0.0
    gamma[5] = -gamma[5].abs()
    beta = torch.randn(C, generator=g)
    _, mean, invstd = torch.native_batch_norm(y, gamma, beta, None, None, True, 0.1, 1e-5)
    return y, gamma, beta, mean, invstd, g


@pytest.mark.parametrize("bits,act,channels_last", CASES)
def test_unit_codes_decode_and_backward_match_eager(bits, act, channels_last):
    y, gamma, beta, mean, invstd, g = _unit_inputs(bits, channels_last)
    perm, shape, C = memory_order(y), tuple(y.shape), y.shape[1]
    kw = dict(bits=bits, window=3.5, pf=0.75, perm=perm)

    data, P = compiled.forward_xh(y, mean, invstd, gamma, beta, act=act, **kw)
    xmin, xmax = (y.amin((0, 2, 3)) - mean) * invstd, (y.amax((0, 2, 3)) - mean) * invstd
    P_eager = ref.code_params(
        bits=bits,
        act=act,
        wmin=xmin,
        wmax=xmax,
        wmean=torch.zeros(C),
        wstd=torch.ones(C),
        gamma=gamma,
        beta=beta,
        coded="xh",
        window=3.5,
        positive_fraction=0.75,
    )
    xh = (y - ref.bview(mean, y)) * ref.bview(invstd, y)
    assert torch.equal(P, P_eager)
    assert torch.equal(data, ref.encode_ref(xh, P_eager, bits, act))

    a = compiled.decode_act(data, P, bits, shape, perm, act, torch.float32)
    a_eager = ref.decode_act_ref(data, P, bits, shape, perm, act, torch.float32)
    assert torch.equal(a, a_eager) and a.stride() == a_eager.stride()

    grad = torch.randn(shape, generator=g)
    out = compiled.unit_backward(grad, data, P, bits, shape, perm, act, gamma, beta, invstd)
    eager = ref.unit_backward_ref(grad, data, P, bits, shape, perm, act, gamma, beta, invstd)
    # same formula, sums in another order: fp32 rounding of 144-term sums (~1e-6 relative)
    for c, e in zip(out[:3], eager[:3]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    assert out[3] is None


@pytest.mark.parametrize("mode", ["residual", "residual_code", "xh"])
def test_join_codes_and_backward_match_eager(mode):
    bits, act = 4, "relu"
    y, gamma, beta, mean, invstd, g = _unit_inputs(bits, False, seed=1)
    perm, shape = memory_order(y), tuple(y.shape)
    r = torch.randn(shape, generator=g)
    if mode == "residual_code":  # the residual is another unit's output, given by its code
        _, r_gamma, r_beta, r_mean, r_invstd, _ = _unit_inputs(bits, False, seed=3)
        r_code = compiled.forward_xh(
            r, r_mean, r_invstd, r_gamma, r_beta, bits=bits, act="relu", window=3.5, pf=0.75, perm=perm
        )
        r = ref.decode_act_ref(*r_code, bits, shape, perm, "relu", torch.float32)
    s = torch.nn.functional.batch_norm(y, None, None, gamma, beta, True) + r
    data, P = compiled.forward_sum(s, gamma, beta, bits=bits, act=act, window=3.5, pf=0.75, perm=perm)
    stats = ref.value_stats(s, "sum")
    P_eager = ref.code_params(
        bits=bits,
        act=act,
        wmin=stats[0],
        wmax=stats[1],
        wmean=stats[2],
        wstd=stats[3],
        gamma=gamma,
        beta=beta,
        coded="sum",
        window=3.5,
        positive_fraction=0.75,
    )
    # the window comes from a two-pass variance (summation order differs from eager's): a few ulp
    torch.testing.assert_close(P, P_eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(data, ref.encode_ref(s, P, bits, act))  # codes: bit for bit given the grid

    kw, kw_eager = {}, None
    if mode == "residual":
        kw["residual"] = r
    elif mode == "residual_code":
        kw["residual_code"] = (*r_code, "relu")
        kw_eager = {"residual": r}  # the eager reference decodes it first
    else:
        xd, xP = compiled.forward_xh(
            y, mean, invstd, gamma, beta, bits=bits, act="none", window=3.5, pf=0.75, perm=perm
        )
        kw["xh_code"] = (xd, xP)
    grad = torch.randn(shape, generator=g)
    out = compiled.unit_backward(grad, data, P, bits, shape, perm, act, gamma, beta, invstd, **kw)
    eager = ref.unit_backward_ref(grad, data, P, bits, shape, perm, act, gamma, beta, invstd, **(kw_eager or kw))
    assert out[3] is not None
    for c, e in zip(out, eager):  # summation order only (see above); xh recovered through 1/gamma
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


def test_layouts_it_does_not_cover_run_eager():
    # 3 * 5 * 5 = 75 codes: not a whole number of packing words at 4 bits; 12 codes: a multiple of 4, not of 8
    assert compiled.layout3((1, 3, 5, 5), (0, 1, 2, 3), 4) is None
    assert compiled.layout3((1, 3, 2, 2), (0, 1, 2, 3), 4) is None
    assert compiled.layout3((1, 3, 2, 2), (0, 1, 2, 3), 2) == (1, 3, 4)
    assert compiled.layout3((1, 3, 5, 5), (0, 1, 2, 3), 8) == (1, 3, 25)
    assert compiled.layout3((2, 8, 3, 3), (0, 2, 3, 1), 2) == (18, 8, 1)
    y = torch.randn(1, 3, 5, 5)
    assert (
        compiled.forward_xh(
            y,
            y.new_zeros(3),
            y.new_ones(3),
            y.new_ones(3),
            y.new_zeros(3),
            bits=4,
            act="relu",
            window=3.5,
            pf=0.75,
            perm=(0, 1, 2, 3),
        )
        is None
    )


def _n_graphs() -> int:
    return sum(len(g.graphs) for g in compiled._ran)


@pytest.fixture
def no_store(monkeypatch):
    """No graphs from disk: a count of graphs is then this process's compilations. (A store filled by an earlier run
    of the same sources can hold a cache hit's code, kept for its own input's sizes only: another shape then
    compiles a graph of its own, one more than a cold run makes.)"""
    monkeypatch.setattr(graphs._Store, "folder", staticmethod(lambda: None))


def test_compile_failure_warns_once_and_falls_back(monkeypatch):
    def broken(*key):
        def fn(*args):
            raise OSError("no C++ compiler")

        return fn

    monkeypatch.setattr(compiled, "_compiled", broken)
    monkeypatch.setattr(compiled, "_failed", None)
    y, gamma, beta, mean, invstd, _ = _unit_inputs(4, False)
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        assert (
            compiled.forward_xh(
                y, mean, invstd, gamma, beta, bits=4, act="relu", window=3.5, pf=0.75, perm=memory_order(y)
            )
            is None
        )
    assert not compiled.enabled(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        assert (
            compiled.decode_act(
                torch.zeros(72, dtype=torch.uint8),
                torch.zeros(11, 4),
                4,
                (1, 4, 6, 6),
                (0, 1, 2, 3),
                "relu",
                torch.float32,
            )
            is None
        )
    monkeypatch.setattr(compiled, "_failed", None)


def test_config_and_environment(monkeypatch):
    with pytest.raises(TypeError, match="compile must be"):
        ApproxConfig(compile="yes")
    monkeypatch.setenv("TRITONACT_COMPILE", "0")
    assert ApproxConfig().effective_compile is False
    assert ApproxConfig(compile=True).effective_compile is True
    monkeypatch.setenv("TRITONACT_COMPILE", "1")
    assert ApproxConfig().effective_compile is True
    assert ApproxConfig(compile=False).effective_compile is False


def test_resnet18_compiled_matches_eager_path():
    """A real model through the compiled path: exact forward, same BN statistics, gradients equal to the eager
    path's up to summation order and the few codes a one-pass variance moves across a bin edge."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(4, 3, 64, 64)
    target = torch.randint(0, 10, (4,))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def run(**kw):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        if kw:
            with tritonact.approximate(model, bits=4, **kw):
                loss = torch.nn.functional.cross_entropy(model(x), target)
                loss.backward()
        else:
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return loss.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}

    ran_before = len(compiled._ran)
    loss_c, grads_c, state_c = run(compile=True)
    assert len(compiled._ran) > ran_before  # the compiled path ran (it is not silently skipped)
    loss_e, grads_e, state_e = run(compile=False)
    loss_x, grads_x, _ = run()
    assert torch.equal(loss_c, loss_x) and torch.equal(loss_e, loss_x)
    for k in state_c:
        assert torch.equal(state_c[k], state_e[k]), k
    worst = 0.0
    for n in grads_c:
        if not n.endswith("conv1.weight") and not n.endswith("conv2.weight"):
            continue
        ref_g = grads_x[n]
        err_c = ((grads_c[n] - ref_g).norm() / ref_g.norm()).item()
        err_e = ((grads_e[n] - ref_g).norm() / ref_g.norm()).item()
        # both are 4-bit approximations of the exact gradient (median ~0.1 on resnet18, docs/results.md); the
        # compiled one may differ from the eager one only by codes that moved across a bin edge
        assert err_c < 0.35 and abs(err_c - err_e) < 0.05, (n, err_c, err_e)
        worst = max(worst, ((grads_c[n] - grads_e[n]).norm() / grads_e[n].norm()).item())
    assert worst < 0.05


def test_maxpool_index_compiled_matches_eager():

    x = torch.randn(2, 3, 9, 11)
    geom = ((3, 3), (2, 2), (1, 1), (1, 1))
    _, idx = torch.nn.functional.max_pool2d(x, *geom[:3], dilation=geom[3], return_indices=True)
    local = compiled.pool_index("local", idx, tuple(x.shape), *geom)
    assert torch.equal(local, ref.local_index(idx, tuple(x.shape), *geom))
    assert torch.equal(compiled.pool_index("global", local, tuple(x.shape), *geom), idx)
    assert math.prod(local.shape) == idx.numel() and local.dtype == torch.uint8


def test_keys_that_differ_only_in_settings_stay_separate():
    """Two keys of one kind (window inf vs 3.5, bits 8 vs 4) compile graphs of their own, each with its settings as
    constants."""
    y, gamma, beta, mean, invstd, _ = _unit_inputs(4, False, seed=2)
    perm, C = memory_order(y), y.shape[1]
    xmin, xmax = (y.amin((0, 2, 3)) - mean) * invstd, (y.amax((0, 2, 3)) - mean) * invstd
    for bits, window in ((8, math.inf), (4, 3.5), (4, math.inf)):
        data, P = compiled.forward_xh(
            y, mean, invstd, gamma, beta, bits=bits, act="relu", window=window, pf=0.75, perm=perm
        )
        P_eager = ref.code_params(
            bits=bits,
            act="relu",
            wmin=xmin,
            wmax=xmax,
            wmean=torch.zeros(C),
            wstd=torch.ones(C),
            gamma=gamma,
            beta=beta,
            coded="xh",
            window=window,
            positive_fraction=0.75,
        )
        assert torch.equal(P, P_eager), (bits, window)
    assert compiled._compiled("forward_xh", 4, "relu", 3.5, 0.75, False, False, -1.0) is not compiled._compiled(
        "forward_xh", 4, "relu", math.inf, 0.75, False, False, -1.0
    )
    assert compiled._compiled("forward_xh", 4, "relu", 3.5, 0.75, False, True, -1.0) is not compiled._compiled(
        "forward_xh", 4, "relu", 3.5, 0.75, False, False, -1.0
    )  # with and without a centroid table
    assert compiled._compiled("forward_xh", 8, "none", math.inf, 0.75, False, False, 3.0) is not compiled._compiled(
        "forward_xh", 8, "none", math.inf, 0.75, False, False, -1.0
    )  # with and without bin edges at the output's +-3


@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("bits,act", [(4, "relu"), (2, "relu6"), (8, "none")])
def test_encode_edge_values_match_reference(bits, act, rows):
    """The compiled encoder (a select between the two grids) against the reference's arithmetic-mask formula on
    values that stress it: NaN, infinities, signed zeros and values exactly on bin edges and window ends; packed
    along rows through uint8 codes and through the flat view."""
    C = 8
    g = torch.Generator().manual_seed(4)
    gamma = torch.randn(C, generator=g)
    gamma[2] = 0.0
    gamma[3] = -1.5
    beta = torch.randn(C, generator=g)
    P = ref.code_params(
        bits=bits,
        act=act,
        wmin=torch.full((C,), -2.0),
        wmax=torch.full((C,), 3.0),
        wmean=torch.zeros(C),
        wstd=torch.ones(C),
        gamma=gamma,
        beta=beta,
        coded="xh",
        window=3.5,
        positive_fraction=0.75,
    )
    w = torch.randn(2, C, 64, generator=g) * 3
    o, sgn = P[ref.R["o"]].view(1, C, 1), P[ref.R["sgn"]].view(1, C, 1)
    k = torch.arange(-8, 8, dtype=torch.float32).view(1, 1, 16)
    w[:, :, :16] = o + sgn * k * P[ref.R["dp"]].view(1, C, 1)  # exactly on positive-grid edges
    w[:, :, 16:32] = o + sgn * k * P[ref.R["dn"]].view(1, C, 1)  # and negative-grid ones
    w[0, :, 32:40] = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30, 6.0])
    w[1, :, 32] = o.view(C)  # v = 0 exactly
    enc = torch.compile(lambda w, P: compiled._encode3(w, P, bits, act == "relu6", rows), dynamic=False)
    got = enc(w, P)
    assert torch.equal(got, ref.encode_ref(w.unsqueeze(-1), P, bits, act))


def test_channel_count_stays_symbolic_for_parameters(no_store):
    """Gamma and beta come as nn.Parameters: one compiled graph must serve several channel counts (none of them
    specialized into the graph), and the sizes of another call must not be mistaken for those of the first."""
    window = 2.75  # a key no other test uses: its first compilation happens here
    graphs = _n_graphs()
    for C in (8, 16, 24):
        y, _, _, mean, invstd, g = _unit_inputs(4, False, seed=C, shape=(2, C, 4, 4))
        gamma = torch.nn.Parameter(torch.rand(C, generator=g) + 0.5)
        beta = torch.nn.Parameter(torch.randn(C, generator=g))
        data, P = compiled.forward_xh(
            y, mean, invstd, gamma, beta, bits=4, act="relu", window=window, pf=0.75, perm=memory_order(y)
        )
        assert P.shape == (len(ref.ROWS), C)
    assert _n_graphs() - graphs == 1


def test_graph_conditions_are_checked_per_input(no_store):
    """A compiled graph holds the shape conditions its trace and compilation assumed; an input outside them gets a
    graph of its own (inductor, for one, sums a per-channel reduction of more than 4096 elements in chunks: a
    condition on the sizes), and each input's results are those of the uncompiled function."""
    key = (4, "relu", 1.25, 0.75, True, False, False, False, torch.float32, torch.float32)  # used by no other test
    raw = compiled._MAKERS["forward_sum"](*key)
    g = torch.Generator().manual_seed(5)
    for shape in ((2, 8, 16), (2, 8, 8192), (2, 8, 16)):  # (a row of 8192: summed in chunks)
        s, gamma, beta = torch.randn(shape, generator=g), torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
        data, P = compiled._call("forward_sum", key, s, gamma, beta)
        data_e, P_e = raw(s, gamma, beta)
        torch.testing.assert_close(P, P_e)  # the sums' order differs; default fp32 tolerances
        assert (data != data_e).float().mean() < 0.01  # codes: equal but where a statistic's last bit moved an edge
    assert len(compiled._compiled("forward_sum", *key).graphs) == 2


def test_graph_is_not_reused_for_other_strides(no_store):
    """Same sizes, other strides (a channels_last max-pool index after an NCHW one): the graph traced for the first
    layout must not serve the second (its generated code indexes by the traced strides); a second graph does."""

    geom = ((3, 2), (2, 1), (1, 0), (1, 1))  # a pooling geometry no other test uses: a key of its own
    x = torch.randn(2, 8, 10, 10)
    for fmt in (torch.contiguous_format, torch.channels_last, torch.contiguous_format):
        _, idx = torch.nn.functional.max_pool2d(
            x.contiguous(memory_format=fmt), *geom[:3], dilation=geom[3], return_indices=True
        )
        local = compiled.pool_index("local", idx, tuple(x.shape), *geom)
        assert torch.equal(local, ref.local_index(idx, tuple(x.shape), *geom)), fmt
    key = next(g for g in compiled._ran if g.name.startswith("pool_index('local', (3, 2), (2, 1)"))
    assert len(key.graphs) == 2


def test_graph_limit_runs_eager_and_remembers(monkeypatch):
    """Past the graphs-per-key limit an input runs eagerly (the entry point returns None), with one warning, and
    the decision is remembered for that input (no compilation attempt per call)."""
    monkeypatch.setattr(graphs, "_GRAPH_LIMIT", 0)
    key = (4, "relu", 1.75, 0.75, True, False, False, False, torch.float32, torch.float32)  # used by no other test
    s, gamma, beta = torch.randn(2, 8, 16), torch.rand(8) + 0.5, torch.randn(8)
    with pytest.warns(RuntimeWarning, match="graphs compiled already"):
        assert compiled._call("forward_sum", key, s, gamma, beta) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled._call("forward_sum", key, s, gamma, beta) is None
    key_graphs = compiled._compiled("forward_sum", *key)
    assert key_graphs.graphs == [] and list(key_graphs.memo.values()) == [False]


@pytest.fixture
def graph_store(tmp_path, monkeypatch):
    """An empty store of compiled graphs (under an empty inductor cache folder)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITONACT_GRAPH_CACHE", raising=False)
    graphs._Store.folder.cache_clear()
    if graphs._Store.folder() is None:
        pytest.skip("this torch cannot serialize a standalone graph")
    yield graphs._Store.folder()
    graphs._Store.folder.cache_clear()


def test_compiled_graphs_are_kept_on_disk_for_the_next_process(graph_store, monkeypatch):
    """A graph compiled once is stored with what it assumes of its inputs; a new process (a new ``Graphs`` of the
    same key) loads it instead of compiling: same results bit for bit, for the input it was made for and for
    another its conditions accept, while an input they do not accept is compiled anew. Unreadable files are
    ignored."""
    key = (4, "relu", 1.125, 0.75, True, False, False, False, torch.float32, torch.float32)  # used by no other test
    name = f"forward_sum{key}"
    fn = compiled._MAKERS["forward_sum"](*key)
    g = torch.Generator().manual_seed(9)
    small = (torch.randn(2, 8, 16, generator=g), torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g))
    other = (torch.randn(3, 8, 24, generator=g), *small[1:])  # same conditions (rows of <= 4096 values)
    large = (torch.randn(2, 8, 8192, generator=g), *small[1:])  # > 4096: inductor sums a row in chunks, a condition
    first = graphs.Graphs(name, fn)
    want = [first(*a) for a in (small, other)]
    assert len(first.graphs) == 1
    files = list(graph_store.glob("*.pkl"))
    assert len(files) == 1
    (graph_store / (files[0].name.split("-")[0] + "-broken.pkl")).write_bytes(b"not a pickle")

    compiles = []
    real = graphs._Graph.compile.__func__
    monkeypatch.setattr(graphs._Graph, "compile", classmethod(lambda cls, *a: compiles.append(1) or real(cls, *a)))
    second = graphs.Graphs(name, fn)  # a new process's
    for a, w in zip((small, other), want):
        for x, y in zip(second(*a), w):
            assert torch.equal(x, y)
    assert compiles == [] and len(second.graphs) == 1
    data, P = second(*large)
    data_e, P_e = fn(*large)
    torch.testing.assert_close(P, P_e)  # (see test_graph_conditions_are_checked_per_input)
    assert compiles == [1] and len(second.graphs) == 2
    assert len(list(graph_store.glob("*-*.pkl"))) == 3  # the new graph stored beside the first (and the broken)


@pytest.mark.parametrize("shape", [(2, 8, 4, 8), (2, 8, 3, 4), (3, 8, 2, 2)], ids=["inner32", "inner12", "inner4"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_decode_from_words_and_from_bytes_match_eager(bits, shape):
    """The graphs decode 2-bit rows that fill whole int32 words from an int32 view (compiled.words3) and other
    codes from the flat bytes: both give the reference's values and gradients, at every width (inner 32: words at
    2 bits; 12 and 4: bytes at every width)."""
    y, gamma, beta, mean, invstd, g = _unit_inputs(bits, False, shape=shape)
    perm = memory_order(y)
    data, P = compiled.forward_xh(y, mean, invstd, gamma, beta, bits=bits, act="relu", window=3.5, pf=0.75, perm=perm)
    words = bits == 2 and shape[2] * shape[3] % 16 == 0
    assert compiled._word_rows(compiled.layout3(shape, perm, bits), bits) == words
    a = compiled.decode_act(data, P, bits, shape, perm, "relu", torch.float32)
    assert torch.equal(a, ref.decode_act_ref(data, P, bits, shape, perm, "relu", torch.float32))
    grad = torch.randn(shape, generator=g)
    out = compiled.unit_backward(grad, data, P, bits, shape, perm, "relu", gamma, beta, invstd)
    eager = ref.unit_backward_ref(grad, data, P, bits, shape, perm, "relu", gamma, beta, invstd)
    for c, e in zip(out[:3], eager[:3]):  # (see test_unit_codes_decode_and_backward_match_eager)
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,act,cent,channels_last", [(4, "relu", True, False), (2, "none", False, True)])
def test_outlier_recode_with_the_compiled_encoder_matches_the_reference(bits, act, cent, channels_last):
    """An outlier recode's last step (codes under its robust grid, and the centroid table over every sample with
    the escaped values left out) compiled: the same bytes, grid and escapes as the reference's."""
    from tritonact import backends, outliers

    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 16, 16, 16, generator=g)  # (256 values per channel and sample: more samples than the
    w = w.relu() if act == "relu" else w  # forward's centroid statistics read, centroids.sample_limit)
    w[0, :, 2, 3] = 60.0  # every channel flagged: the bulk on a robust grid, these escaped
    w[5, 3, 1, 1] = -45.0
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    kw = dict(bits=bits, act=act, coded="sum", gamma=torch.ones(16), beta=torch.zeros(16), window=3.5, pf=0.75,
              cent=cent)  # fmt: skip
    data, P, esc = outliers.recode(w, **kw)
    cdata, cP, cesc = outliers.recode(w, encode=backends.get("compiled").encode, **kw)
    assert esc.shape[0] >= 16 and torch.equal(cesc, esc)
    assert torch.equal(cP, P) and torch.equal(cdata, data)
    if cent:  # the table was measured (not left at its initial 0.5 offsets)
        assert not torch.all(P[ref.PARAM_ROWS :] == 0.5)


def test_a_graph_traced_with_aliased_arguments_reads_each_argument(monkeypatch):
    """One tensor passed as both gamma and 1/sigma must not compile a graph that reads gamma for 1/sigma in later
    calls of its key (graphs.Graphs traces aliased arguments as separate inputs)."""
    monkeypatch.setenv("TRITONACT_GRAPH_CACHE", "0")  # a graph of this run, not one on disk
    monkeypatch.setattr(graphs._Store, "folder", staticmethod(lambda: None))
    compiled._compiled.cache_clear()
    y, gamma, beta, mean, invstd, g = _unit_inputs(4, False, seed=5)
    perm, shape = memory_order(y), tuple(y.shape)
    data, P = compiled.forward_xh(y, mean, invstd, gamma, beta, bits=4, act="relu", window=3.5, pf=0.75, perm=perm)
    grad = torch.randn(shape, generator=g)
    one = torch.ones_like(gamma)
    compiled.unit_backward(grad, data, P, 4, shape, perm, "relu", one, beta, one)  # gamma is 1/sigma: traced first
    out = compiled.unit_backward(grad, data, P, 4, shape, perm, "relu", gamma, beta, invstd)
    want = ref.unit_backward_ref(grad, data, P, 4, shape, perm, "relu", gamma, beta, invstd)
    for c, e in zip(out[:3], want[:3]):  # (see test_unit_codes_decode_and_backward_match_eager)
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    compiled._compiled.cache_clear()


def test_a_cache_hit_s_code_is_stored_for_its_own_input_only(graph_store, monkeypatch):
    """A hit in inductor's whole-graph caches may restore code that assumes more than the trace's conditions (a
    stored forward graph asserted rows of 4 values, and a later process fed it rows of 324). The graph that runs is
    compiled again without those caches; the hit's code, the only one that serializes, is stored for the example's
    own sizes and strides, so another process loads it for that input and compiles for any other."""
    import torch._inductor
    from torch._dynamo.utils import counters

    real = torch._inductor.standalone_compile

    def hit_first(gm, fakes, **kwargs):
        out = real(gm, fakes, **kwargs)
        if kwargs.get("aot"):
            counters["inductor"]["fxgraph_cache_hit"] += 1  # as if this one came from inductor's cache
        return out

    monkeypatch.setattr(torch._inductor, "standalone_compile", hit_first)
    key = (4, "relu", 1.375, 0.75, True, False, False, False, torch.float32, torch.float32)  # used by no other test
    name = f"forward_sum{key}"
    fn = compiled._MAKERS["forward_sum"](*key)
    g = torch.Generator().manual_seed(4)
    small = (torch.randn(2, 8, 16, generator=g), torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g))
    other = (torch.randn(3, 8, 24, generator=g), *small[1:])
    first = graphs.Graphs(name, fn)
    want = [first(*a) for a in (small, other)]
    assert len(first.graphs) == 1  # in this process: one graph, its conditions from the trace
    (entry,) = graphs._STORE.entries(name)
    assert entry.accepts(small) and not entry.accepts(other)
    monkeypatch.setattr(torch._inductor, "standalone_compile", real)
    second = graphs.Graphs(name, fn)  # a new process's
    for a, w in zip((small, other), want):
        for x, y in zip(second(*a), w):
            assert torch.equal(x, y)
    assert len(second.graphs) == 2  # the stored one (small) and a new one (other)


def test_two_keys_with_the_same_graph_each_store_it_for_every_input(graph_store):
    """The centroid statistics of ReLU and of no activation are one graph under two keys. Inductor's whole-graph
    caches are keyed by the tritonact key too (``cache_key_tag``), so the second key's compilation is no cache hit,
    whose code would be stored for its own input only and be compiled again by every later process."""
    if not hasattr(torch.compiler.config, "cache_key_tag"):
        pytest.skip("this torch has no cache key tag")
    g = torch.Generator().manual_seed(6)

    def args(outer, inner):
        return (torch.randn(outer, 8, inner, generator=g), torch.rand(8, ref.PARAM_ROWS, generator=g).t(),
                torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5)  # fmt: skip

    small, other = args(2, 16), args(3, 24)
    for act in ("relu", "none"):
        key = (4, "xh", act, False, False, False, torch.float32)
        name = f"centroid_stats{key}"
        graphs.Graphs(name, compiled._MAKERS["centroid_stats"](*key))(*small)
        (entry,) = graphs._STORE.entries(name)
        assert entry.accepts(small) and entry.accepts(other), act
