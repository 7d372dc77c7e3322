"""The one configuration object of ``tritonact.approximate``."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ApproxConfig", "DEFAULT_WINDOW", "DEFAULT_POSITIVE_FRACTION"]

# Half-width (in standard deviations of the coded value) of the window the code levels cover, per bit width;
# values outside are clamped into the end bins (their ReLU mask stays exact). At 8 bits the observed min/max is
# used: clipping error dominates there. At 4 and 2 bits the step size dominates, so a window narrower than the
# observed range wins. Chosen by measurement (docs/method.md, "Window").
DEFAULT_WINDOW = {8: math.inf, 4: 4.0, 2: 2.5}
# Fraction of the code levels above the ReLU threshold (they feed the next convolution's weight gradient); the
# rest code the values below it (used only by the BN variance term).
DEFAULT_POSITIVE_FRACTION = 0.75

_BITS = (2, 4, 8)


@dataclass(frozen=True)
class ApproxConfig:
    """Options of :func:`tritonact.approximate`.

    Args:
        bits: code width of stored activations: 2, 4 or 8.
        naive: quantize inside the forward pass (later layers compute on approximations); a baseline only.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA, torch on CPU).
        window: half-width of the coded window in standard deviations; ``None`` picks ``DEFAULT_WINDOW[bits]``,
            ``math.inf`` uses the observed per-channel min/max.
        positive_fraction: share of code levels above the ReLU threshold, in (0, 1).
        ring: keep full-precision activations in a ring of shared buffers (see docs/memory.md).
    """

    bits: int = 4
    naive: bool = False
    backend: str | None = None
    window: float | None = None
    positive_fraction: float = DEFAULT_POSITIVE_FRACTION
    ring: bool = True

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
        if isinstance(pf, bool) or not isinstance(pf, (int, float)) or not 0 < pf < 1:
            raise ValueError(f"positive_fraction must be in (0, 1), got {pf!r}")
        if not isinstance(self.ring, bool):
            raise TypeError(f"ring must be a bool, got {self.ring!r}")

    @property
    def effective_window(self) -> float:
        return float(DEFAULT_WINDOW[self.bits] if self.window is None else self.window)
