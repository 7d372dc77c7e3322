"""The one configuration object of ``tritonact.approximate``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

__all__ = ["ApproxConfig", "DEFAULT_WINDOW", "DEFAULT_POSITIVE_FRACTION", "MANY_VALUES", "MIN_VALUES"]

# Half-width (in standard deviations of the coded value) of the window the code levels cover, per bit width;
# values outside are clamped into the end bins (their ReLU mask stays exact). At 8 bits the observed min/max is
# used: clipping error dominates there. At 4 and 2 bits the step size dominates, so a window narrower than the
# observed range wins. Chosen by measurement on torchvision resnet18/resnet50 (perf/sweep_window.py; docs/method.md,
# "Window"): 3.5 at 4 bits (lowest max error; median within 0.002 of the best at 64x64, best-but-one at 128x128),
# 2.0 at 2 bits (lowest median).
DEFAULT_WINDOW = {8: math.inf, 4: 3.5, 2: 2.0}
# Fraction of the code levels above the ReLU threshold (they feed the next convolution's weight gradient); the
# rest code the values below it (used only by the BN variance term). 0.75 won at every bit width (same sweep):
# 12 + 4 levels at 4 bits, 3 + 1 at 2 bits, 192 + 64 at 8 bits.
DEFAULT_POSITIVE_FRACTION = 0.75
# ... where the BN sees fewer than MANY_VALUES values per channel (batch x height x width). With more, the levels
# below the threshold are worth less than above it: at init the variance term's share of the BN's input gradient
# falls like 1/sqrt(values), and the conv weight gradients read only the values above it. So from MANY_VALUES on,
# 0.875 (14 + 2 levels at 4 bits). Measured (resnet50, 4 bits, 8 x 64x64, seeds 0-2, second codes at the joins with
# at most JOIN_FEW_VALUES values): 0.75 everywhere 0.1009, 0.875 from 2048 values 0.1007, from 512 0.0962, from 128
# 0.0945, everywhere 0.1081 (layer4's 32 values per channel need the levels below the threshold).
MANY_VALUES = 128
MANY_VALUES_POSITIVE_FRACTION = 0.875

# A BN that sees fewer values than this per channel (batch x height x width) runs exactly (and the generic
# path, tritonact.saved, keeps such tensors as they are): with so few values its
# input gradient nearly cancels (it is orthogonal to 1 and to x_hat), and what is left is dominated by the codes'
# rounding. Measured on resnet18, 4 bits, 48 small batches (3x24x24, 2x32x32, 4x32x32, 6x24x24; layer4 sees 2-6
# values): worst conv gradient error median 0.24 and max 1.82 with codes everywhere, 0.126 / 0.146 from 16 on
# (8: 0.136 / 0.157). Storing those few values in full costs nothing measurable.
MIN_VALUES = 16

_BITS = (2, 4, 8)


@dataclass(frozen=True)
class ApproxConfig:
    """Options of :func:`tritonact.approximate`.

    Args:
        bits: code width of stored activations: 2, 4 or 8.
        naive: quantize inside the forward pass (later layers compute on approximations); a baseline only.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA, torch on CPU).
        window: half-width of the coded window in standard deviations; ``None`` picks ``DEFAULT_WINDOW[bits]``
            (``inf`` / 3.5 / 2.0 at 8 / 4 / 2 bits), ``math.inf`` uses the observed per-channel min/max.
        positive_fraction: share of code levels above the ReLU threshold, in ``(0.5 / 2**bits, 1)`` (at or below
            the lower end no level would be left above the threshold). ``None`` (default): per unit,
            ``DEFAULT_POSITIVE_FRACTION`` (0.75) where its BN sees fewer than ``MANY_VALUES`` (128) values per
            channel, 0.875 from there on (:meth:`positive_fraction_for`). Where a channel has values on both
            sides of the threshold, ``max(1, round(2**bits * (1 - positive_fraction)))`` levels code the values
            below it (at 2 bits always one).
        ring: keep full-precision activations in a ring of shared buffers (docs/memory.md). ``None`` (default)
            and ``False``: off. Its slots stay allocated between steps while the peak of a step is set in the
            backward pass, so the ring adds its slots to the peak (measured on CPU, docs/memory.md; not yet on a
            GPU). Results are bitwise identical either way.
        compile: run the CPU path's per-unit work compiled by TorchInductor's C++ backend (one or two graphs per
            kind of unit, a few seconds each; the C++ is cached on disk by torch) instead of eager op by op. ``None``
            (default): on, unless the environment sets ``TRITONACT_COMPILE=0``. Same codes as eager (bit for bit
            given the same grid); no effect on CUDA tensors (the Triton kernels run there).
        generic: the generic path (``tritonact.saved``, docs/method.md): every other floating-point tensor
            autograd saves inside the model in a training forward (SiLU, GELU, Hardswish inputs, squeeze-excitation
            operands, LayerNorm and Linear inputs, BatchNorms that are not units) is kept as a ``bits``-bit
            per-channel code. Default True. Eager forwards only (not inside ``torch.compile``).
        join_codes: codes per residual join (BN + add + activation). ``1``: the code of the sum, from which the
            BN's normalized value is recovered for its variance term (and a second code only where some
            ``|gamma|`` is below ``JOIN_MIN_GAMMA``); ``2``: every join also codes the BN's normalized value;
            ``"few"`` (default): as ``1``, plus the second code at each join whose BN sees at most
            ``JOIN_FEW_VALUES`` (256) values per channel (batch x height x width): there the variance term weighs
            most, and the second code costs little. ``"auto"``: as ``"few"``, and at 4 and 8 bits also at each
            join whose sum spreads so far beyond its BN's own output that the recovery would cost more than
            ``JOIN_MAX_SPREAD`` times a direct code's error (decided before every training forward from the
            previous one's grid, so the codes kept can change during training; the residual stream grows with
            depth). Conv weight gradient median error at 4 bits, 8 x 64x64 at init (docs/method.md section 3):
            resnet18 0.091 (``1``) / 0.083 (``"few"``) / 0.083 (``2``), resnet50 0.107 / 0.095 / 0.095, resnet152
            0.142 / 0.104 / 0.104.
        decode: what a code decodes to in the backward pass. ``"centroid"``: the mean of the values that produced
            it, measured per channel and code during the forward (``tritonact.centroids``; a table of
            ``4 * 2**bits`` bytes per channel); ``"midpoint"``: the middle of its bin; ``"auto"`` (default):
            centroids for codes of 2 and 4 bits, midpoints at 8 bits (a 1 KiB table per channel would outweigh
            small batches' codes; the generic path's 8-bit codes never get one). Measured at init (resnet18,
            3 seeds, 8 x 64x64; docs/method.md section 5) the conv gradient median error goes from 0.0067 / 0.109 /
            0.371 to 0.0044 / 0.097 / 0.351 at 8 / 4 / 2 bits.
    """

    bits: int = 4
    naive: bool = False
    backend: str | None = None
    window: float | None = None
    positive_fraction: float | None = None
    ring: bool | None = None
    compile: bool | None = None
    generic: bool = True
    join_codes: int | str = "few"
    decode: str = "auto"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in _BITS:
            raise ValueError(f"bits must be one of {_BITS}, got {self.bits!r}")
        if not isinstance(self.naive, bool):
            raise TypeError(f"naive must be a bool, got {self.naive!r}")
        if self.backend not in (None, "triton", "torch"):
            raise ValueError(f"backend must be 'triton', 'torch' or None, got {self.backend!r}")
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, (int, float)) or not self.window > 0:
                raise ValueError(f"window must be a positive number of standard deviations, got {self.window!r}")
        pf = self.positive_fraction
        if pf is not None and (isinstance(pf, bool) or not isinstance(pf, (int, float)) or not 0 < pf < 1):
            raise ValueError(f"positive_fraction must be in (0, 1) or None, got {pf!r}")
        if pf is not None and round((1 << self.bits) * (1 - pf)) >= (1 << self.bits):
            # every level would code values below the ReLU threshold: no positive bin, an all-zero mask, and every
            # gradient through a unit exactly 0
            raise ValueError(
                f"positive_fraction={pf!r} leaves no code level above the ReLU threshold at {self.bits} bits; it must "
                f"be greater than 0.5 / 2**bits = {0.5 / (1 << self.bits):g}"
            )
        if self.ring is not None and not isinstance(self.ring, bool):
            raise TypeError(f"ring must be True, False or None, got {self.ring!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise TypeError(f"compile must be True, False or None, got {self.compile!r}")
        if not isinstance(self.generic, bool):
            raise TypeError(f"generic must be True or False, got {self.generic!r}")
        if isinstance(self.join_codes, bool) or self.join_codes not in (1, 2, "few", "auto"):
            raise ValueError(f"join_codes must be 1, 2, 'few' or 'auto', got {self.join_codes!r}")
        if self.decode not in ("auto", "centroid", "midpoint"):
            raise ValueError(f"decode must be 'auto', 'centroid' or 'midpoint', got {self.decode!r}")

    def positive_fraction_for(self, values: int) -> float:
        """The positive fraction of a unit whose BN sees ``values`` values per channel."""
        if self.positive_fraction is not None:
            return float(self.positive_fraction)
        return MANY_VALUES_POSITIVE_FRACTION if values >= MANY_VALUES else DEFAULT_POSITIVE_FRACTION

    def centroids(self, bits: int) -> bool:
        """Whether codes of ``bits`` bits carry a centroid table under this config's ``decode``."""
        return self.decode == "centroid" or (self.decode == "auto" and bits <= 4)

    @property
    def effective_compile(self) -> bool:
        if self.compile is not None:
            return self.compile
        return os.environ.get("TRITONACT_COMPILE", "1") != "0"

    @property
    def effective_window(self) -> float:
        return float(DEFAULT_WINDOW[self.bits] if self.window is None else self.window)
