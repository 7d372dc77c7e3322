"""What the generic path (``tritonact.saved``) keeps in place of a saved tensor, and how each decodes.

:class:`Coded` is a k-bit per-channel code of the tensor itself; :class:`UnitRef` a unit's output, decoded from the
unit's own code; :class:`Derived` an activation's output, decoded as the activation of its input's code;
:class:`PoolIndex` a max-pool's argmax as its uint8 position in the window (exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tritonact import centroids, outliers
from tritonact import reference as ref
from tritonact.quant import memory_order

__all__ = ["Coded", "UnitRef", "Derived", "PoolIndex", "DERIVED", "encode"]


@dataclass(eq=False)
class Coded:
    """The k-bit code of one saved tensor: packed codes (memory order), its ``(PARAM_ROWS, C)`` grid and what
    decoding needs."""

    data: torch.Tensor
    P: torch.Tensor
    bits: int
    shape: tuple
    perm: tuple
    dtype: torch.dtype
    compiled: bool = False  # made by the compiled CPU path (decoded by it too)
    act: str = "relu"  # "relu6": the top code is the saturation, decoded as 6 (and negatives as 0)
    esc: torch.Tensor | None = None  # escaped values (tritonact.outliers)

    @property
    def nbytes(self) -> int:
        extra = self.esc.untyped_storage().nbytes() if self.esc is not None else 0
        return self.data.untyped_storage().nbytes() + self.P.untyped_storage().nbytes() + extra

    def decode(self) -> torch.Tensor:
        """The approximate tensor, in the original dtype, shape and memory order."""
        if self.compiled and _compiled_ok(self.data) and self.esc is None:
            from tritonact import compiled

            # act "none": A * v~ + B with A = 1, B = 0 (the grid of a "sum" code), i.e. v~ itself; "relu6":
            # max(v~, 0) with the saturation, all a ReLU6's backward reads
            act = "none" if self.act == "relu" else self.act
            w = compiled.decode_act(self.data, self.P, self.bits, self.shape, self.perm, act, self.dtype)
            if w is not None:
                return w
        w, _ = ref.decode_value_ref(self.data, self.P, self.bits, self.shape, self.perm, self.act, esc=self.esc)
        if self.act == "relu6":
            w.clamp_(min=0.0)  # as the compiled decode
        return w if self.dtype == torch.float32 else w.to(self.dtype)


def encode(x: torch.Tensor, bits: int, window: float, compile: bool = False, act: str = "relu", cent=False) -> Coded:
    """The code of ``x`` (float, channels at dim 1): per-channel grid from its min/max, clipped to ``window``
    standard deviations around the channel mean where ``window`` is finite. ``compile``: on CPU, the compiled
    unit forward of ``tritonact.compiled`` (the same formulas) where it applies. ``cent``: with a centroid table
    (``tritonact.centroids``)."""
    with torch.no_grad():
        if compile and _compiled_ok(x):
            from tritonact import compiled

            one = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
            perm = memory_order(x)
            c = compiled.forward_sum(
                x.detach(), one, one * 0.0, bits=bits, act=act, window=window, pf=None, perm=perm, centroids=cent
            )
            if c is not None and not (outliers.flagged(c[1]) and outliers.far(x.float())):
                return Coded(c[0], c[1], bits, tuple(x.shape), perm, x.dtype, True, act)
        x32 = x.detach()
        if x32.dtype != torch.float32:
            x32 = x32.float()
        if not x32.permute(memory_order(x32)).is_contiguous():  # a view with gaps: code a dense copy
            x32 = x32.contiguous()
        dims = ref.channel_dims(x32)
        wmin, wmax = x32.amin(dim=dims), x32.amax(dim=dims)
        if math.isinf(window):
            mean = std = wmin  # unused by code_params for an infinite window
        else:
            var, mean = torch.var_mean(x32, dim=dims, unbiased=False)
            std = var.sqrt()
        one = torch.ones_like(wmin)
        P = ref.code_params(
            bits=bits,
            act=act,
            wmin=wmin,
            wmax=wmax,
            wmean=mean,
            wstd=std,
            gamma=one,
            beta=torch.zeros_like(wmin),
            coded="sum",
            window=window,
            positive_fraction=None,
            centroids=cent,
        )
        perm = memory_order(x32)
        if outliers.flagged(P) and outliers.far(x32):  # outliers: robust statistics, their values escaped
            one = torch.ones_like(wmin)
            data, P, esc = outliers.recode(x32, bits=bits, act=act, coded="sum", gamma=one,
                                           beta=one * 0.0, window=window, pf=None, cent=cent)  # fmt: skip
            return Coded(data, P, bits, tuple(x.shape), perm, x.dtype, False, act, esc)
        acc = centroids.new_acc(bits, x32.shape[1], x32.device) if cent else None
        data = ref.encode_ref(x32, P, bits, act, acc, centroids.sample_limit(tuple(x32.shape), perm, bits))
        if cent:
            centroids.finish_(P, acc, ref.PARAM_ROWS)
    return Coded(data, P, bits, tuple(x.shape), memory_order(x32), x.dtype, False, act)


def _compiled_ok(t: torch.Tensor) -> bool:
    from tritonact import backends, compiled

    return compiled.enabled(t.device) and not backends.user_mode_active()


# Elementwise activations whose output can be recomputed from a code of their input: where ``s = f(x)`` and ``x``
# has a code (a unit's, or the generic one ``f``'s own backward made it keep), an op that saves ``s`` (the next
# convolution, a squeeze-excitation multiply) gets ``f(decode(x))`` instead of a code of its own: one code serves
# the norm's backward, the activation's and the consumer's. ``x``'s code is an 8-bit one (the activation's input
# gradient reads the value), finer than the ``bits``-bit code ``s`` would get.
DERIVED = {
    "silu": torch.nn.functional.silu,
    "hardswish": torch.nn.functional.hardswish,
    "mish": torch.nn.functional.mish,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


@dataclass(eq=False)
class UnitRef:
    """A saved tensor that is a unit's output: decoded from the unit's own code."""

    code: object  # rewrite.calls.Code
    backend: str
    dtype: torch.dtype

    @property
    def bits(self) -> int:
        return self.code.bits

    def decode(self) -> torch.Tensor:
        from tritonact import backends

        c = self.code
        code = backends.CodeRef(c.data, c.P, None, tuple(c.shape), tuple(c.perm), c.bits, c.act, (), c.esc)
        return backends.get(self.backend).decode(code, self.dtype)


@dataclass(eq=False)
class Derived:
    """A saved tensor ``DERIVED[kind](x)`` (or, kind ``"scale"``, ``x * factor`` with a small per-channel
    ``factor``: a squeeze-excitation gate), decoded as that function of ``x``'s decoded code (a ``Coded``, a
    ``UnitRef`` or another ``Derived``)."""

    base: object
    kind: str
    dtype: torch.dtype
    shape: tuple | None = None  # a contiguous reshape of the activation's output (None: as it is)
    factor: object = None  # kind "scale": the gate, (N, C, 1, 1) or smaller, or its code
    factor_version: int = 0  # the gate's version when the product was computed

    @property
    def bits(self) -> int:
        return self.base.bits

    def decode(self) -> torch.Tensor:
        factor = self.factor
        if isinstance(factor, torch.Tensor) and factor._version != self.factor_version:
            raise RuntimeError(
                "tritonact: a multiply's per-channel factor (a squeeze-excitation gate) was modified in place "
                "after the multiply; its product cannot be decoded"
            )
        x = self.base.decode()
        if self.kind == "scale":
            s = x * (factor if isinstance(factor, torch.Tensor) else factor.decode())
        else:
            s = DERIVED[self.kind](x)
        s = s.to(self.dtype)
        return s if self.shape is None else s.contiguous().reshape(self.shape)


@dataclass(eq=False)
class PoolIndex:
    """A max-pool's saved argmax (int64, a flat position in the input plane) kept as the uint8 position inside its
    window (``reference.local_index``): 1 byte instead of 8 per output element, decoded exactly."""

    local: torch.Tensor
    args: tuple  # in_shape, kernel, stride, padding, dilation

    @property
    def nbytes(self) -> int:
        return self.local.untyped_storage().nbytes()

    def decode(self) -> torch.Tensor:
        return ref.global_index(self.local, *self.args)
