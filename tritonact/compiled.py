"""The CPU path's per-unit work, compiled: the torch reference's formulas fused by ``torch.compile`` (TorchInductor).

In eager PyTorch a unit's forward codes, its backward and the decode for a convolution's weight gradient each take
about ten elementwise passes over the activation plus a few dozen tiny per-channel ops; compiled, each is one or two
vectorized C++ loops. The formulas are those of :mod:`tritonact.reference` in the same operation order, compiled
without floating-point contraction (inductor's default), so given the same grid ``P`` the codes and decoded values
equal the reference bit for bit; per-channel statistics and backward sums differ from eager only in summation order.

Layout: a tensor dense in memory order ``perm`` is viewed as ``(outer, C, inner)`` (NCHW: ``(N, C, H*W)``,
channels_last: ``(N*H*W, C, 1)``) and per-channel ``(C,)`` vectors as ``(1, C, 1)``; codes are packed and unpacked
32 bits at a time (see ``_pack``). Shapes whose number of codes is not a multiple of 4 run the eager reference.
Each function is compiled once per static key (bits, activation, window, dtype...) with dynamic sizes, so a model's
many shapes share one compilation.

``ApproxConfig(compile=False)`` or ``TRITONACT_COMPILE=0`` turns compilation off (the eager reference runs). If
compiling fails (no C++ compiler, an unsupported torch), a warning says why once and the eager reference runs from
then on.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import sys
import types
import warnings

import torch

from tritonact import reference as ref
from tritonact.quant import _inverse

__all__ = ["enabled", "layout3", "forward_xh", "forward_sum", "decode_act", "unit_backward", "pool_index"]

_R = ref.R
_failed: str | None = None  # why compilation was given up, once it was
_ran: set = set()  # compiled functions that have run once


def enabled(device: torch.device) -> bool:
    """Whether the compiled path can run for tensors on ``device`` (CPU only: the GPU has the Triton kernels)."""
    return device.type == "cpu" and _failed is None


@functools.lru_cache(maxsize=4096)
def layout3(shape, perm, bits: int) -> tuple[int, int, int] | None:
    """``(outer, C, inner)`` view of a tensor of logical ``shape`` dense in memory order ``perm``, or None where
    the word-level packing below does not apply: a number of codes not a multiple of 4, or a big-endian host."""
    if sys.byteorder != "little" or (bits != 8 and math.prod(shape) % 4):
        return None
    pos = perm.index(1)
    return math.prod(shape[d] for d in perm[:pos]), shape[1], math.prod(shape[d] for d in perm[pos + 1 :])


def view3(x: torch.Tensor, perm, v3) -> torch.Tensor:
    """``x`` (dense in memory order ``perm``) viewed as ``v3``."""
    return x.permute(perm).view(v3)


def unview3(x3: torch.Tensor, shape, perm) -> torch.Tensor:
    """Inverse of :func:`view3`: the logical ``shape`` with memory order ``perm``."""
    return x3.view([shape[d] for d in perm]).permute(_inverse(perm))


# ----------------------------------------------------------------------------------------------------------
# compiled bodies (closures over static settings; sizes are dynamic)


def _pv(t: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` vector viewed to broadcast against ``(outer, C, inner)``."""
    return t.view(1, -1, 1)


def _params(bits, act, coded, window, pf, wmin, wmax, wmean, wstd, gamma, beta):
    return ref.code_params(bits=bits, act=act, wmin=wmin, wmax=wmax, wmean=wmean, wstd=wstd, gamma=gamma, beta=beta,
                           coded=coded, window=window, positive_fraction=pf)


# Packing ``8 // bits`` codes per byte, LSB first, 32 bits at a time: on a little-endian host the bytes of an int32
# word are consecutive elements, so one word holds 4 one-byte codes, and shifting its nibbles (crumbs) together packs
# them into 2 bytes (1 byte); the inverse spreads a byte's fields back over a word's bytes. Word arithmetic vectorizes
# (int32: inductor does not vectorize int16 shifts); gathering adjacent elements into a byte does not.


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (one per element, each < 2**bits, a multiple of 4 of them) -> packed bytes, flat."""
    q = q.reshape(-1)
    if bits == 8:
        return q
    w = q.view(torch.int32)
    if bits == 4:
        w = (w & 0x0F) | ((w >> 4) & 0xF0) | ((w >> 8) & 0x0F00) | ((w >> 12) & 0xF000)
        return w.to(torch.int16).view(torch.uint8)
    return ((w & 0x03) | ((w >> 6) & 0x0C) | ((w >> 12) & 0x30) | ((w >> 18) & 0xC0)).to(torch.uint8)


def _unpack(d: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed bytes (flat) -> uint8 codes, one per element, flat."""
    if bits == 8:
        return d
    if bits == 4:
        w = d.view(torch.int16).to(torch.int32)
        return ((w & 0x0F) | ((w << 4) & 0x0F00) | ((w << 8) & 0x0F0000) | ((w << 12) & 0x0F000000)).view(torch.uint8)
    w = d.to(torch.int32)
    return ((w & 0x03) | ((w << 6) & 0x0300) | ((w << 12) & 0x030000) | ((w << 18) & 0x03000000)).view(torch.uint8)


def _encode3(w, P, bits, relu6):
    """Packed codes of ``w`` (fp32 ``(outer, C, inner)``): ``reference.encode_ref``'s formula, op for op."""
    p = lambda name: _pv(P[_R[name]])  # noqa: E731
    L1 = float((1 << bits) - 1)
    v = (w - p("o")) * p("sgn")
    q = torch.minimum(torch.floor(v.clamp(min=0.0) * p("rdp")), p("qtop") - p("nneg")).clamp(min=0.0)
    b = torch.minimum(torch.floor(-v.clamp(max=0.0) * p("rdn")), p("nneg") - 1.0)
    q = q + p("nneg") - (b + 1.0) * (1.0 - torch.sign(v).clamp(min=0.0))
    if relu6:
        q = torch.where(v >= p("vhi"), L1, q)
    q = q.clamp(0.0, L1)
    return _pack(torch.where(q == q, q, 0.0).to(torch.uint8), bits)  # NaN -> 0 (nan_to_num does not vectorize)


def _decode3(d, P, bits, act, v3):
    """``(v~, mask)`` (fp32, bool; shape ``v3``) of the packed codes ``d``: ``reference._decode_v``'s formula."""
    q = _unpack(d, bits).view(v3).float()
    p = lambda name: _pv(P[_R[name]])  # noqa: E731
    t = q - p("nneg") + 0.5
    mask = t > 0
    v = t.clamp(max=0.0) * p("dn") + t.clamp(min=0.0) * p("dp")
    if act in (None, "relu6"):
        sat = q > p("qtop")
        v = torch.where(sat, p("vhi"), v)
        mask = mask & ~sat
    return v, mask


def _make_forward_xh(bits, act, window, pf):
    def forward_xh(y3, mean, invstd, gamma, beta):
        # xh is monotone in y: its range comes from y's (as in ops._unit_forward_torch)
        xmin = (y3.amin(dim=(0, 2)).float() - mean) * invstd
        xmax = (y3.amax(dim=(0, 2)).float() - mean) * invstd
        zero = torch.zeros_like(xmin)
        P = _params(bits, act, "xh", window, pf, xmin, xmax, zero, zero + 1.0, gamma, beta)
        xh = (y3.float() - _pv(mean)) * _pv(invstd)
        return _encode3(xh, P, bits, act == "relu6"), P

    return forward_xh


def _make_forward_sum(bits, act, window, pf):
    def forward_sum(s3, gamma, beta):
        s = s3.float()
        var, mean = torch.var_mean(s, dim=(0, 2), unbiased=False)
        P = _params(bits, act, "sum", window, pf, s.amin(dim=(0, 2)), s.amax(dim=(0, 2)), mean, var.sqrt(), gamma,
                    beta)
        return _encode3(s, P, bits, act == "relu6"), P

    return forward_sum


def _make_decode_act(bits, act, dtype):
    def decode_act(d, P, like3):
        v, _ = _decode3(d, P, bits, act, like3.shape)
        if act != "none":
            v = v.clamp(min=0.0)
        return (v * _pv(P[_R["A"]]) + _pv(P[_R["B"]])).to(dtype)

    return decode_act


def _make_backward(bits, act, mode):
    """``mode``: "plain" (xh from the code), "residual" (xh = (s - r - beta) / gamma), "xh" (a second code)."""

    def unit_backward(g3, d, P, gamma, beta, invstd, r3, xd, xP):
        v, mask = _decode3(d, P, bits, act, g3.shape)
        g_z = g3.float()
        if act != "none":
            g_z = g_z * mask
        if mode == "xh":
            xv, _ = _decode3(xd, xP, bits, "none", g3.shape)
            xh = xv * _pv(xP[_R["sgn"]]) + _pv(xP[_R["o"]])
        else:
            xh = v * _pv(P[_R["sgn"]]) + _pv(P[_R["o"]])
            if mode == "residual":
                g_safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
                xh = (xh - r3.float() - _pv(beta)) / _pv(g_safe)
        sum_gz = g_z.sum(dim=(0, 2))
        sum_gzxh = (g_z * xh).sum(dim=(0, 2))
        M = g3.numel() // gamma.numel()
        g_y = (g_z - _pv(sum_gz / M) - xh * _pv(sum_gzxh / M)) * _pv(gamma * invstd)
        return g_y, sum_gzxh, sum_gz, (g_z if mode != "plain" else None)

    return unit_backward


def _make_pool_index(direction, kernel, stride, padding, dilation):
    from tritonact import ops  # (ops imports this module)

    f = ops._local_index if direction == "local" else ops._global_index

    def pool_index(t, w_like):
        return f(t, (0, 0, 0, w_like.shape[0]), kernel, stride, padding, dilation)

    return pool_index


_MAKERS = {"forward_xh": _make_forward_xh, "forward_sum": _make_forward_sum, "decode_act": _make_decode_act,
           "backward": _make_backward, "pool_index": _make_pool_index}


def _no_cuda_runtime_line(record: logging.LogRecord) -> bool:
    return "No CUDA runtime is found" not in record.getMessage()


def _quiet_cpp_extension() -> None:
    """Inductor imports ``torch.utils.cpp_extension``, which warns "No CUDA runtime is found" on every CPU-only
    machine; that line says nothing about this path, so it is filtered (only it)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if _no_cuda_runtime_line not in logger.filters:
        logger.addFilter(_no_cuda_runtime_line)


@functools.cache
def _compiled(kind: str, *key):
    _quiet_cpp_extension()
    fn = _MAKERS[kind](*key)
    # A code object of its own per key, with a name of its own: dynamo keeps its cache (and its recompile limit) per
    # code object, and its automatic-dynamic state per (file, line, name). Shared with another key, the closure's
    # settings (bits, window...) would look like values that change between calls and be traced as symbols.
    name = f"{fn.__name__}__" + re.sub(r"\W", "_", "_".join(map(str, key)))
    names = {"co_name": name, **({"co_qualname": name} if sys.version_info >= (3, 11) else {})}
    code = fn.__code__.replace(**names)
    fn = types.FunctionType(code, fn.__globals__, name, None, fn.__closure__)
    # not fullgraph: past dynamo's recompile limit (many dtypes/layouts through one key) the function then runs
    # eagerly - the same formulas, slower - instead of raising
    return torch.compile(fn, dynamic=None)


def _call(kind: str, key: tuple, *args):
    """Run compiled ``kind`` for ``key``; tensor sizes are marked dynamic (one compilation serves every shape).
    Returns None (the caller runs the eager reference) once compilation has failed."""
    global _failed
    if _failed is not None:
        return None
    fn = _compiled(kind, *key)
    for t in args:  # every call: a recompile (new dtype, layout) must not specialize sizes
        if isinstance(t, torch.Tensor):
            for d in range(t.dim()):
                torch._dynamo.maybe_mark_dynamic(t, d)
    try:
        out = fn(*args)
        _ran.add(fn)
        return out
    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the eager reference, loudly once
        if not _is_compile_error(e):
            raise
        _failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"tritonact: compiling the CPU path failed ({_failed}); the eager torch reference runs instead "
                      "(set TRITONACT_COMPILE=0 to skip the attempt)", RuntimeWarning, stacklevel=3)
        return None


def _is_compile_error(e: Exception) -> bool:
    mod = type(e).__module__
    return mod.startswith(("torch._dynamo", "torch._inductor", "torch.fx")) or isinstance(e, (OSError, ImportError))


# ----------------------------------------------------------------------------------------------------------
# entry points (None: not compiled here, run the reference)


def forward_xh(y, mean, invstd, gamma, beta, *, bits, act, window, pf, perm):
    v3 = layout3(tuple(y.shape), perm, bits)
    if v3 is None:
        return None
    out = _call("forward_xh", (bits, act, window, pf), view3(y, perm, v3), mean, invstd, gamma, beta)
    return out


def forward_sum(s, gamma, beta, *, bits, act, window, pf, perm):
    v3 = layout3(tuple(s.shape), perm, bits)
    if v3 is None:
        return None
    out = _call("forward_sum", (bits, act, window, pf), view3(s, perm, v3), gamma, beta)
    return out


def decode_act(data, P, bits, shape, perm, act, dtype):
    v3 = layout3(tuple(shape), perm, bits)
    if v3 is None:
        return None
    like3 = torch.empty((), dtype=torch.uint8, device=data.device).expand(v3)  # carries the shape only
    a3 = _call("decode_act", (bits, act, dtype), _aligned(data), P, like3)
    return None if a3 is None else unview3(a3, shape, perm)


def unit_backward(g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual=None, xh_code=None):
    v3 = layout3(tuple(shape), perm, bits)
    if v3 is None:
        return None
    mode = "xh" if xh_code is not None else ("residual" if residual is not None else "plain")
    r3 = view3(_dense_like(residual, perm), perm, v3) if residual is not None else None
    xd, xP = (_aligned(xh_code[0]), xh_code[1]) if xh_code is not None else (None, None)
    args = (view3(_dense_like(g, perm), perm, v3), _aligned(data), P, gamma, beta, invstd, r3, xd, xP)
    out = _call("backward", (bits, act, mode), *args)
    if out is None:
        return None
    g_y, g_gamma, g_beta, g_res = out
    return (unview3(g_y, shape, perm), g_gamma, g_beta, unview3(g_res, shape, perm) if g_res is not None else None)


def _aligned(data: torch.Tensor) -> torch.Tensor:
    """Packed codes starting on a word boundary (a slice of a sample range may not)."""
    return data if data.storage_offset() % 4 == 0 else data.clone()


def _dense_like(t: torch.Tensor, perm) -> torch.Tensor:
    """``t`` dense in memory order ``perm`` (a copy only if it is not already)."""
    tp = t.permute(perm)
    return t if tp.is_contiguous() else tp.contiguous().permute(_inverse(perm))


def pool_index(direction: str, t, in_shape, kernel, stride, padding, dilation):
    """``ops._local_index`` (``direction="local"``) or ``ops._global_index`` (``"global"``), compiled."""
    w_like = torch.empty((), dtype=torch.uint8, device=t.device).expand(in_shape[3])  # carries W only
    return _call("pool_index", (direction, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)), t, w_like)
