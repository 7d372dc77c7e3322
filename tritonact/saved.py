"""The generic path: the other floating-point tensors autograd saves inside a converted model, kept as k-bit codes.

Units code what their BatchNorm produces. Everything else an op saves for its backward (the input of a SiLU, GELU
or Hardswish, both operands of a squeeze-excitation multiply, a concatenation that feeds a convolution, the input
of a LayerNorm, a Linear or a BatchNorm that is not a unit) is, without this path, kept in full. While a converted
model runs a training forward, ``torch.autograd.graph.saved_tensors_hooks`` give each such tensor, at the moment
autograd saves it, a per-channel (dim 1) k-bit code on a threshold-anchored grid (``reference.code_params`` with
the bin edge at 0 and the levels split between the two signs by their extent), and the backward decodes it when
autograd asks for the tensor. The sign of every value survives exactly, so the masks that ReLU, LeakyReLU and
friends compute from their saved tensor are exact; zeros decode to ``-1e-20``-small values. The forward never
sees a code: it stays exact. The argmax an ``nn.MaxPool2d`` saves (int64) is kept as its uint8 position inside
the window, decoded exactly. An op that reads its saved tensor only for a weight gradient, a norm's variance
term or a sign (``COARSE``) gets a ``bits``-bit code; any other gets an 8-bit one (see ``COARSE``).

Never coded: parameters and buffers (and views of them), the forward's own inputs, integer, bool and float64
tensors, tensor subclasses, tensors of fewer than ``MIN_NUMEL`` elements or fewer than
``config.MIN_VALUES`` values per channel, what tritonact's own ops save, the inputs torch.utils.checkpoint
recomputes from (a recomputation from codes would be an approximate forward), and everything while other
``saved_tensors_hooks`` are active around the model (``torch.utils.checkpoint`` around it, a user's offloading
hooks), which this path would otherwise bypass. ``ApproxConfig(generic=False)`` turns it off.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref

import torch

from tritonact import reference as ref
from tritonact.config import DEFAULT_WINDOW, MIN_VALUES
from tritonact.saved_codes import DERIVED, Coded, Derived, PoolIndex, UnitRef, encode

__all__ = [
    "Coded", "PoolIndex", "GenericPath", "encode", "passthrough", "derive", "derive_product", "DERIVED", "MIN_NUMEL",
    "DOUBLE_BACKWARD_GENERIC",
]  # fmt: skip

MIN_NUMEL = 4096  # smaller saved tensors (gates, pooled features, logits) are kept as they are
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_STATE = threading.local()

DOUBLE_BACKWARD_GENERIC = (
    "tritonact: double backward (create_graph=True, e.g. a gradient penalty or a Hessian-vector product) through "
    "a tensor the generic path keeps as a k-bit code is not supported; run that step outside "
    "tritonact.approximate, or pass generic=False"
)


@contextlib.contextmanager
def passthrough():
    """Inside: tensors saved for backward are kept as they are (tritonact's own ops save codes already)."""
    prev = getattr(_STATE, "passthrough", False)
    _STATE.passthrough = True
    try:
        yield
    finally:
        _STATE.passthrough = prev


# Modules whose ops read a saved tensor only for a weight gradient, a norm's variance term or its sign: coding it
# costs error in that layer alone. Every other op that saves an activation (SiLU, GELU, Hardswish, sigmoid, a
# multiply, anything functional) reads it for the gradient that flows on to earlier layers, where the rounding
# compounds with depth: such tensors are coded at 8 bits. Measured on mobilenet_v3_small (4 bits, 8 samples of
# 64x64, conv weight gradient error median / max): every tensor at 4 bits 0.293 / 0.403, Hardswish inputs at 8 bits
# 0.187 / 0.332, all but the convolutions' inputs at 8 bits 0.160 / 0.267 (units alone: 0.096).
COARSE = (
    torch.nn.modules.conv._ConvNd,
    torch.nn.Linear,
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.ReLU,
    torch.nn.LeakyReLU,
    torch.nn.modules.pooling._MaxPoolNd,
    torch.nn.modules.pooling._AvgPoolNd,  # its backward reads only the saved input's shape
    torch.nn.modules.pooling._AdaptiveAvgPoolNd,
)
# ReLU6 (a Hardtanh from 0 to 6) masks at 6 too: its saved tensor is coded on a grid whose top code is the
# saturation (decoded as exactly 6), as in a ReLU6 unit. Without it every saturated value decoded just below 6 and
# let its gradient through (timm rexnet_100 at 8 bits: stem conv gradient error 0.13 instead of 0.02). A Hardtanh
# with other bounds is kept as it is.


def _saver(frame) -> str:
    """Who saves a tensor, from the Python frames above the hook (``frame`` first): ``"coarse"`` for an op of one
    of the ``COARSE`` modules, ``"relu6"`` for a ReLU6, ``"keep"`` for another Hardtanh, ``"recompute"`` for
    torch.utils.checkpoint keeping the inputs it recomputes from (a recomputation from codes would run an
    approximate forward; kept too), else ``"fine"``. The innermost frame whose
    ``self`` is a module says which module runs."""
    m, _ = _module_of(frame)
    if m is _RECOMPUTE:
        return "recompute"
    if isinstance(m, torch.nn.Hardtanh):
        return "relu6" if (m.min_val, m.max_val) == (0.0, 6.0) else "keep"
    return "coarse" if isinstance(m, COARSE) and not isinstance(m, torch.fx.GraphModule) else "fine"


_RECOMPUTE = object()


def _module_of(frame):
    """``(module, its frame)`` of the innermost module forward above ``frame`` (``_RECOMPUTE`` for
    torch.utils.checkpoint's own frames), or ``(None, None)``."""
    while frame is not None:
        if frame.f_globals.get("__name__") == "torch.utils.checkpoint":
            return _RECOMPUTE, frame
        s = frame.f_locals.get("self")
        if isinstance(s, torch.nn.Module):
            return s, frame
        frame = frame.f_back
    return None, None


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def pool_index(t: torch.Tensor, frame) -> PoolIndex | None:
    """``t`` as a :class:`PoolIndex` where it is the argmax an ``nn.MaxPool2d`` (called above ``frame``) saves."""
    m, f = _module_of(frame)
    if not isinstance(m, torch.nn.MaxPool2d):
        return None
    x = f.f_locals.get("input")
    kernel = _pair(m.kernel_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or kernel[0] * kernel[1] > 256:
        return None
    stride = _pair(m.stride if m.stride is not None else m.kernel_size)
    args = (tuple(x.shape), kernel, stride, _pair(m.padding), _pair(m.dilation))
    if tuple(t.shape[:2]) != tuple(x.shape[:2]):
        return None
    with torch.no_grad():
        return PoolIndex(ref.local_index(t, *args), args)


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device, s.data_ptr(), s.nbytes())


def _top_hooks():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # private; absent: assume none
    return top(False) if top is not None else None


class GenericPath:
    """The generic path of one converted model. ``forward(model, args, kwargs)`` is the context of one training
    forward; ``last_*`` describe the last one."""

    def __init__(self, bits: int, window: float, compile: bool = False, centroids: bool = False):
        self.bits, self.window, self.compile, self.centroids = bits, float(window), compile, centroids
        self.last_code_bytes = 0  # bytes of the codes the last training forward stored
        self.last_full_bytes = 0  # bytes the same tensors take as autograd would have kept them
        self.last_tensors = 0
        self.last_fine = 0  # of those, coded at 8 bits (saved by an op whose input gradient reads the value)
        self.last_reused = 0  # of those, kept by a code stored already (a unit's, or an activation input's)
        self.last_derived = 0  # of those, an activation's output kept by its input's code (``DERIVED``)
        self.last_kept_bytes = 0  # floating-point tensors saved as they are (inputs, small ones, ...), not parameters
        self.skipped: str | None = None  # why the last training forward ran without this path

    def forward(self, model: torch.nn.Module, args, kwargs):
        top = _top_hooks()
        if top is not None:
            owner = getattr(top[0], "__self__", None)
            if isinstance(owner, _Session):  # an enclosing converted module's forward codes already
                return contextlib.nullcontext()
            from tritonact.memory import SavedTensorCounter

            if not isinstance(owner, SavedTensorCounter):  # never bypass a user's hooks or a checkpoint's
                self.skipped = "other saved_tensors_hooks were active around the model"
                return contextlib.nullcontext()
        self.skipped = None
        return _Session(self, model, args, kwargs)


def own(*tensors) -> None:
    """tritonact's own saved tensors (grids with their centroid tables, statistics) of the open training forward: the
    generic path leaves them as they are. (An autograd.Function's saves are packed after its forward returns, outside
    any ``passthrough`` block.)"""
    s = getattr(_STATE, "session", None)
    if s is not None:
        s.keep.update(_storage_key(t) for t in tensors if t is not None and t.numel())


def offer(out: torch.Tensor, code, backend: str) -> None:
    """A unit's output and its code (``rewrite.calls.Code``): an op of the open training forward that saves
    ``out`` as it is gets a reference to this code instead of a code of its own."""
    s = getattr(_STATE, "session", None)
    if s is not None and not torch.compiler.is_compiling():
        s.offered[_key(out)] = (weakref.ref(out), out._version, code, backend)


def _key(t: torch.Tensor):
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def derive(s: torch.Tensor, x: torch.Tensor, kind: str, factor: torch.Tensor | None = None) -> torch.Tensor:
    """``s``, the exact ``DERIVED[kind](x)`` (kind ``"scale"``: ``x * factor``) of the open training forward;
    returned as it is. Where ``x`` has a code by now, an op that later saves ``s`` unchanged gets :class:`Derived`
    from it (see ``DERIVED``)."""
    if torch.compiler.is_compiling():
        return s
    sess = getattr(_STATE, "session", None)
    if sess is not None and isinstance(s, torch.Tensor) and isinstance(x, torch.Tensor) and s is not x:
        base = sess.code_of(x)
        if base is not None:
            version = factor._version if isinstance(factor, torch.Tensor) else 0
            entry = (weakref.ref(s), s._version, base, kind, factor, version)
            sess.derived[_key(s)] = entry
            if s.is_contiguous():  # also a reshaped view of it (what a Linear on a 4-d input saves)
                sess.derived[(s.data_ptr(), s.dtype, s.numel())] = entry
    return s


def derive_product(s: torch.Tensor, a, b) -> torch.Tensor:
    """``s = a * b`` of the open training forward, returned as it is. Where one factor has a code and the other is a
    small per-channel tensor (a squeeze-excitation gate, ``(N, C, 1, 1)``, a layer scale, a drop-path's per-sample
    mask), an op that later saves ``s`` gets it as the decoded factor times the gate (as the multiply's own
    backward keeps it: itself, or its code where it is big enough to have one)."""
    if torch.compiler.is_compiling() or getattr(_STATE, "session", None) is None:
        return s
    if not all(isinstance(t, torch.Tensor) for t in (s, a, b)):
        return s
    for x, g in ((a, b), (b, a)):
        gs = (1,) * (x.dim() - g.dim()) + tuple(g.shape)  # broadcast from the right
        if (
            x.shape == s.shape
            and x.dim() >= 3
            and len(gs) == x.dim()
            and all(n == 1 for n in gs[2:])
            and gs[0] in (1, x.shape[0])
            and gs[1] in (1, x.shape[1])
            and g.dtype == s.dtype
        ):
            # the gate as the multiply's backward keeps it: its code where it has one (a big batch), else itself
            sess = _STATE.session
            fac = sess.code_of(g) if g.numel() >= MIN_NUMEL else g.detach()
            return derive(s, x, "scale", fac) if fac is not None else s
    return s


class _Session:
    def __init__(self, path: GenericPath, model, args, kwargs):
        self.path = path
        self.params = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.keep = self.params | {_storage_key(t) for t in inputs}
        self.kept: set = set()  # storages of floating-point tensors saved as they are (counted once)
        self.cache: dict = {}  # _key -> (weakref to the tensor, its version, Coded): one code per saved tensor
        self.offered: dict = {}  # _key -> (weakref to a unit's output, its version, its Code, backend)
        self.derived: dict = {}  # _key -> (weakref to s, its version, its input's code, kind, factor): ``derive``
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)

    def __enter__(self):
        p = self.path
        p.last_code_bytes = p.last_full_bytes = p.last_tensors = p.last_fine = p.last_reused = p.last_kept_bytes = 0
        p.last_derived = 0
        self.hooks.__enter__()
        self.prev, _STATE.session = getattr(_STATE, "session", None), self
        return self

    def __exit__(self, *exc):
        _STATE.session = self.prev
        self.hooks.__exit__(*exc)
        self.cache.clear()
        self.offered.clear()
        self.derived.clear()
        self.kept.clear()
        return False

    def _big(self, t) -> bool:
        return (
            type(t) is torch.Tensor
            and t.layout == torch.strided
            and t.device.type != "meta"
            and t.dim() >= 2
            and t.numel() >= MIN_NUMEL
            and not getattr(_STATE, "passthrough", False)
            and _storage_key(t) not in self.keep
        )

    def _count_kept(self, t) -> None:
        if (
            isinstance(t, torch.Tensor)
            and t.dtype.is_floating_point
            and t.layout == torch.strided
            and t.device.type != "meta"
            and not getattr(_STATE, "passthrough", False)  # tritonact's own saves: codes, grids, statistics
        ):
            key = _storage_key(t)
            if key not in self.params and key not in self.kept:
                self.kept.add(key)
                self.path.last_kept_bytes += t.untyped_storage().nbytes()

    def code_of(self, x: torch.Tensor):
        """The code this forward keeps of ``x`` as it is now (a unit's ``UnitRef`` or a ``Coded``), or None."""
        unit = self.offered.get(_key(x))
        if unit is not None and unit[0]() is x and unit[1] == x._version:
            return UnitRef(unit[2], unit[3], x.dtype)
        hit = self.cache.get((*_key(x), "relu"))
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            return hit[2]
        return self._derived(x)

    def _derived(self, t: torch.Tensor) -> Derived | None:
        """``t`` as a :class:`Derived`: an activation output of this forward (``derive``), or a contiguous reshape of
        one, unchanged since."""
        d = self.derived.get(_key(t))
        if d is not None and d[0]() is t and d[1] == t._version:
            return Derived(d[2], d[3], t.dtype, None, d[4], d[5])
        d = self.derived.get((t.data_ptr(), t.dtype, t.numel())) if t.is_contiguous() else None
        s = d[0]() if d is not None else None
        if s is not None and s.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() and d[1] == t._version:
            return Derived(d[2], d[3], t.dtype, tuple(t.shape), d[4], d[5])
        return None

    def _codable(self, t) -> bool:
        return t.dtype in _FLOATS and self._big(t) and t.numel() // max(t.shape[1], 1) >= MIN_VALUES

    def pack(self, t):
        from tritonact.memory import note_saved

        saver = None
        if isinstance(t, torch.Tensor) and self._codable(t):
            saver = _saver(sys._getframe(1))
        elif isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.dim() == 4 and self._big(t):
            idx = pool_index(t, sys._getframe(1))
            if idx is not None:
                self.path.last_full_bytes += t.numel() * 8
                self.path.last_code_bytes += idx.nbytes
                self.path.last_tensors += 1
                note_saved(idx.local)
                return idx
        if saver in (None, "recompute", "keep"):
            note_saved(t)
            self._count_kept(t)
            return t
        act = "relu6" if saver == "relu6" else "relu"
        key = (*_key(t), act)
        p = self.path
        unit = self.offered.get(_key(t)) if act == "relu" else None
        if unit is not None and unit[0]() is t and unit[1] == t._version:
            code, backend = unit[2], unit[3]
            if saver == "coarse" or code.bits >= 8:  # else: code it at 8 bits below
                p.last_reused += 1
                p.last_tensors += 1
                p.last_full_bytes += t.numel() * t.element_size()
                return UnitRef(code, backend, t.dtype)
        hit = self.cache.get(key)
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            return hit[2]
        d = self._derived(t) if act == "relu" else None
        if d is not None and (saver == "coarse" or d.base.bits >= 8):
            p.last_reused += 1
            p.last_derived += 1
            p.last_tensors += 1
            p.last_full_bytes += t.numel() * t.element_size()
            return d
        if p.bits < 8 and saver == "fine":
            c = encode(t, 8, DEFAULT_WINDOW[8], p.compile)  # no table: 1 KiB per channel
            p.last_fine += 1
        else:
            c = encode(t, p.bits, p.window, p.compile, act, p.centroids and p.bits <= 4)
        self.cache[key] = (weakref.ref(t), t._version, c)
        p.last_code_bytes += c.nbytes
        p.last_full_bytes += t.numel() * t.element_size()
        p.last_tensors += 1
        note_saved(c.data)
        note_saved(c.P)
        return c


def _unpack(c):
    if isinstance(c, PoolIndex):
        return c.decode()  # exact
    if not isinstance(c, (Coded, UnitRef, Derived)):
        return c
    if torch.is_grad_enabled():  # a backward with create_graph=True: the code is not differentiable
        raise RuntimeError(DOUBLE_BACKWARD_GENERIC)
    return c.decode()
