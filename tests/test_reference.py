"""The CPU path's encode/decode (in-place, few temporaries) equals the documented formula bit for bit."""

import math

import pytest
import torch

from tritonact import reference as ref
from tritonact.quant import _channel_view_shape, _inverse, memory_order, pack_codes, unpack_codes


def formula_encode(w, P, bits):
    perm = memory_order(w)
    wp = w.permute(perm)
    p = {n: P[i].view(_channel_view_shape(wp.shape, perm)) for i, n in enumerate(ref.ROWS)}
    L1 = float((1 << bits) - 1)
    v = (wp - p["o"]) * p["sgn"]
    qp = p["nneg"] + torch.minimum(torch.floor(v * p["rdp"]), p["qtop"] - p["nneg"])
    qn = p["nneg"] - 1.0 - torch.minimum(torch.floor(-v * p["rdn"]), p["nneg"] - 1.0)
    q = torch.where(v > 0, qp, qn)
    q = torch.where(v >= p["vhi"], L1, q)
    q = torch.clamp(q, 0.0, L1)
    q = torch.where(torch.isnan(v), 0.0, q)
    return pack_codes(q.to(torch.uint8), bits)


def formula_decode(data, P, bits, shape, perm):
    perm_shape = [shape[d] for d in perm]
    q = unpack_codes(data, bits, math.prod(shape)).view(perm_shape).float()
    p = {n: P[i].view(_channel_view_shape(perm_shape, perm)) for i, n in enumerate(ref.ROWS)}
    pos, sat = q >= p["nneg"], q > p["qtop"]
    v = (q - p["nneg"] + 0.5) * torch.where(pos, p["dp"], p["dn"])
    v = torch.where(sat, p["vhi"], v)
    inv = _inverse(perm)
    return (p["o"] + p["sgn"] * v).permute(inv), (pos & ~sat).permute(inv), v, p


def grid(w, bits, act, coded, seed):
    g = torch.Generator().manual_seed(seed)
    C = w.shape[1]
    gamma = torch.randn(C, generator=g)
    gamma[0] = 0.0
    beta = torch.randn(C, generator=g) * 2
    stats = ref.value_stats(w.nan_to_num(0.0, 0.0, 0.0), coded)
    window = [math.inf, 4.0, 2.5][seed % 3]
    return ref.code_params(
        bits=bits,
        act=act,
        wmin=stats[0],
        wmax=stats[1],
        wmean=stats[2],
        wstd=stats[3],
        gamma=gamma,
        beta=beta,
        coded=coded,
        window=window,
        positive_fraction=0.75,
    )


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act", ["relu", "relu6", "none"])
@pytest.mark.parametrize("coded", ["xh", "sum"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_encode_decode_equal_formula(bits, act, coded, channels_last):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(3, 5, 7, 7, generator=g) * 3
    w.view(-1)[::37] = 0.0
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    for seed in range(3):
        P = grid(w, bits, act, coded, seed)
        data = ref.encode_ref(w, P, bits, act)
        torch.testing.assert_close(data, formula_encode(w, P, bits), rtol=0, atol=0)
        perm = memory_order(w)
        w_f, m_f, v_f, p = formula_decode(data, P, bits, w.shape, perm)
        w_d, m_d = ref.decode_value_ref(data, P, bits, w.shape, perm, act)
        torch.testing.assert_close(w_d, w_f, rtol=0, atol=0)
        assert torch.equal(m_d, m_f)
        a_f = (p["A"] * (v_f.clamp(min=0.0) if act != "none" else v_f) + p["B"]).permute(_inverse(perm))
        a_d = ref.decode_act_ref(data, P, bits, w.shape, perm, act, torch.float32)
        torch.testing.assert_close(a_d, a_f, rtol=0, atol=0)
        assert a_d.stride() == w.stride()


def test_non_finite_values_get_defined_codes():
    w = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.5]).view(1, 1, 4)
    P = ref.code_params(
        bits=4,
        act="relu",
        wmin=torch.tensor([-1.0]),
        wmax=torch.tensor([1.0]),
        wmean=torch.zeros(1),
        wstd=torch.ones(1),
        gamma=torch.ones(1),
        beta=torch.zeros(1),
        coded="xh",
        window=math.inf,
        positive_fraction=0.75,
    )
    data = ref.encode_ref(w, P, 4, "relu")
    torch.testing.assert_close(data, formula_encode(w, P, 4), rtol=0, atol=0)
    assert unpack_codes(data, 4, 4).tolist()[:3] == [0, 15, 0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(16, 3, 5, 5), (9, 7, 3, 3), (1, 4, 2, 2)])
def test_sample_chunks_cover_codes_on_byte_boundaries(bits, shape):
    per = math.prod(shape[1:])
    chunks = list(ref.sample_chunks(shape, (0, 1, 2, 3), bits, target=2 * per))
    assert chunks[0][:3] == (0, min(chunks[0][1], shape[0]), 0)
    assert chunks[-1][1] == shape[0] and chunks[-1][3] == (shape[0] * per * bits + 7) // 8
    for (n0, n1, b0, b1), nxt in zip(chunks, chunks[1:] + [None]):
        assert b0 == n0 * per * bits // 8
        assert (n0 * per * bits) % 8 == 0  # starts on a byte
        if nxt is not None:
            assert nxt[0] == n1 and nxt[2] == b1
    # encoding chunk by chunk gives the same bytes as encoding the whole tensor
    w = torch.randn(shape)
    P = grid(w, bits, "relu", "xh", 0)
    whole = ref.encode_ref(w, P, bits)
    parts = torch.cat([ref.encode_ref(w[n0:n1], P, bits) for n0, n1, _, _ in chunks])
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
