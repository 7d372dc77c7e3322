"""``tritonact.approximate``: the context manager that turns a model's backward pass approximate."""

from __future__ import annotations

import contextlib
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.optim.optimizer as _optimizer
from torch import nn

from tritonact.config import ApproxConfig
from tritonact.report import ApproxReport, kept_in_full
from tritonact.rewrite import Rewritten, derives, generate, has_hooks, make_plan, trace
from tritonact.rewrite.calls import backend_name
from tritonact.rewrite.plan import decide_joins
from tritonact.rewrite.state import TRACING, structure
from tritonact.saved import GenericPath

__all__ = ["approximate", "ApproxReport", "NoUnitRan"]

_ACTIVE: weakref.WeakSet = weakref.WeakSet()
_OPEN = {"depth": 0, "saved": False}  # open contexts, and the user's capture_dynamic_output_shape_ops
_OPEN_LOCK = threading.Lock()


def _capture_dynamic_outputs(enter: bool) -> None:
    """While a context is open, ``torch.compile`` traces ops whose output size depends on data (a unit's escaped
    outliers, ``tritonact.outliers``) instead of breaking the graph at each unit (dynamo's
    ``capture_dynamic_output_shape_ops``; ``fullgraph=True`` allows them anyway). The user's setting comes back
    when the last context closes."""
    import torch._dynamo

    cfg = torch._dynamo.config
    with _OPEN_LOCK:
        if enter:
            if _OPEN["depth"] == 0:
                _OPEN["saved"] = cfg.capture_dynamic_output_shape_ops
                cfg.capture_dynamic_output_shape_ops = True
            _OPEN["depth"] += 1
        else:
            _OPEN["depth"] -= 1
            if _OPEN["depth"] == 0:
                cfg.capture_dynamic_output_shape_ops = _OPEN["saved"]


_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)  # the norms a unit can be made of


class approximate:
    """Exact forward, k-bit activations for backward, for every BN(+add)+ReLU unit of ``model``.

    Args:
        model: the ``nn.Module`` to train; it is not re-created or copied, only its ``forward`` is swapped
            while the context is open (restored on exit, also after an exception).
        bits: 2, 4 or 8.
        naive: quantize inside the forward pass instead (a baseline whose error compounds with depth).
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA tensors, torch on CPU).
        window, positive_fraction, ring, compile, generic, join_codes, decode: see :class:`tritonact.ApproxConfig`.

    Example::

        with tritonact.approximate(model, bits=4) as ctx:
            for x, y in loader:
                loss = criterion(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
        print(ctx.report())
    """

    def __init__(
        self,
        model: nn.Module,
        bits: int | None = None,
        *,
        config: ApproxConfig | None = None,
        naive: bool | None = None,
        backend: str | None = None,
        window: float | None = None,
        positive_fraction: float | None = None,
        ring: bool | None = None,
        compile: bool | None = None,
        generic: bool | None = None,
        join_codes: int | str | None = None,
        decode: str | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        given = {
            k: v
            for k, v in dict(bits=bits, naive=naive, backend=backend, window=window,
                             positive_fraction=positive_fraction, ring=ring, compile=compile,
                             generic=generic, join_codes=join_codes, decode=decode).items()
            if v is not None
        }  # fmt: skip
        if config is not None:
            if not isinstance(config, ApproxConfig):
                raise TypeError(f"config must be a tritonact.ApproxConfig, got {type(config).__name__}")
            if given:
                raise TypeError(
                    f"approximate() got both config= and the keyword arguments {sorted(given)}; put those "
                    "options into the ApproxConfig (e.g. dataclasses.replace(config, ...)) or drop config="
                )
            self.config = config
        else:
            self.config = ApproxConfig(**given)
        self.model = model
        cfg = self.config
        on = cfg.generic and not cfg.naive
        self._generic = (
            GenericPath(cfg.bits, cfg.effective_window, cfg.effective_compile, cfg.decode != "midpoint") if on else None
        )
        self._swapped: list = []  # (module, had an instance forward, that forward)
        self._rewritten: list = []
        self._report: ApproxReport | None = None
        self._cache: list[_Conversion] = []  # newest first
        self._backend = "torch"
        self._ran = self._warned = False  # a converted forward ran in training; NoUnitRan was given

    # -- context protocol --------------------------------------------------------------------------------
    def __enter__(self) -> approximate:
        model = self.model
        if model in _ACTIVE:
            raise RuntimeError(f"tritonact.approximate is already active on this {type(model).__name__}")
        if _in_forward(model):
            raise RuntimeError(
                f"tritonact.approximate entered while {type(model).__name__} is running its forward; "
                "enter the context outside the forward pass"
            )
        self._backend = backend_name(self.config, _model_device(model))
        self._cache.clear()
        self._ran = self._warned = False
        try:
            # entered in eval mode: convert the model as it will train (every submodule in training mode)
            self._build(train_all=not model.training)
        except BaseException:
            self._restore()
            raise
        _ACTIVE.add(model)
        _capture_dynamic_outputs(True)
        _watch_optimizer_steps(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        for conv in self._cache:
            for _, rw in conv.report.rewritten:
                if rw.ring is not None:
                    rw.ring.release()
        self._cache.clear()
        if self.model in _ACTIVE:
            _capture_dynamic_outputs(False)
        _ACTIVE.discard(self.model)
        _CONTEXTS.discard(self)
        return False

    def report(self) -> ApproxReport:
        """The conversion report (units, bytes of codes from the last training forward, what stayed exact)."""
        if self._report is None:
            raise RuntimeError("report() is available once the context has been entered")
        return self._report

    # -- conversion -----------------------------------------------------------------------------------------
    def _build(self, train_all: bool = False) -> None:
        """Convert the model as it is now, or put back an earlier conversion of exactly this structure."""
        self._restore()
        shape = structure(self.model, all_training=train_all)
        for conv in self._cache:
            if conv.shape == shape:
                break
        else:
            ring = self.config.ring
            on = ring is True  # None (the default): off, see ApproxConfig.ring
            self._report = ApproxReport(bits=self.config.bits, ring_on=on)
            self._rewritten = self._report.rewritten
            self._report.generic = self._generic
            with TRACING.exclusive():
                self._convert(self.model, "", self._backend, train_all)
            if self._generic is not None and not any(m is self.model for m, _ in self._swapped):
                # no converted graph at the top: the model's own forward, run under the generic path
                fwd = _Forward(self, self.model, None, self.model.__dict__.get("forward"))
                fwd.shape = structure(self.model, all_training=train_all)
                self._swapped.append((self.model, fwd))
            conv = _Conversion(shape, self._report, self._swapped[:])
            self._swapped.clear()
            self._cache.insert(0, conv)
            for old in self._cache[_CACHED:]:
                for _, rw in old.report.rewritten:
                    if rw.ring is not None:
                        rw.ring.release()
            del self._cache[_CACHED:]
        self._report, self._rewritten = conv.report, conv.report.rewritten
        for module, fwd in conv.forwards:
            self._swap(module, fwd)

    def _changed(self) -> bool:
        return not self._cache or self._cache[0].shape != structure(self.model)

    def _convert(self, module: nn.Module, prefix: str, backend: str, train_all: bool) -> None:
        try:
            if "forward" in module.__dict__:
                raise TypeError("an instance-level forward is set on the module (the class's forward is not what runs)")
            gm = trace(module, train_all)
        except Exception as e:  # untraceable: convert the children that trace, leave this level exact
            self._report.exact.append(
                (
                    prefix.rstrip(".") or type(module).__name__,
                    f"not traceable ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                )
            )
            for name, child in module.named_children():
                if any(isinstance(m, _NORMS) for m in child.modules()):
                    self._convert(child, f"{prefix}{name}.", backend, train_all)
            return
        plan = make_plan(gm, self.config, backend, prefix)
        rep = self._report
        if self._generic is None:  # else the generic path codes them where they are saved
            rep.exact += kept_in_full(gm, plan)
        rep.units += [spec for spec, _, _ in plan.units.values()]
        rep.coded_convs += [prefix + n.target for n in plan.convs]
        rep.coded_pools += [prefix + n.target for n in plan.pools]
        rep.exact += plan.exact
        if plan.units or (self._generic is not None and derives(gm)):
            rw = generate(gm, plan, self.config)
            self._rewritten.append((prefix, rw))
            if rw.ring_plan is not None:
                rep.ring_kept_out += [(name, why) for name, why in rw.ring_plan.kept_out]
            fwd = _Forward(self, module, rw, module.__dict__.get("forward"))
            fwd.shape = structure(module, all_training=train_all)
            fwd.modules = [
                (n, m, m.training or train_all, has_hooks(m)) for n, m in module.named_modules(remove_duplicate=False)
            ]
            self._swapped.append((module, fwd))
        if not plan.units and not prefix:
            rep.exact.append(
                (
                    type(module).__name__,
                    "no BatchNorm2d unit found: "
                    + (
                        "the generic path codes what autograd saves"
                        if self._generic
                        else "the whole model runs exactly"
                    ),
                )
            )
        # modules kept as calls because they have hooks: convert their insides separately
        for node in gm.graph.nodes:
            if node.op == "call_module":
                sub = gm.get_submodule(node.target)
                if has_hooks(sub) and any(isinstance(m, _NORMS) for m in sub.modules()):
                    if not isinstance(sub, _NORMS):
                        rep.exact.append(
                            (
                                prefix + node.target,
                                "has user hooks: called as a module so they fire, "
                                "converted inside; its output is not coded",
                            )
                        )
                        self._convert(sub, f"{prefix}{node.target}.", backend, train_all)

    def _swap(self, module: nn.Module, fwd: _Forward) -> None:
        had = "forward" in module.__dict__
        fwd.active = True
        module.forward = fwd
        self._swapped.append((module, had, fwd.prev))

    def _restore(self) -> None:
        while self._swapped:
            module, had, prev = self._swapped.pop()
            if isinstance(module.__dict__.get("forward"), _Forward):
                module.__dict__["forward"].active = False
            if had:
                module.__dict__["forward"] = prev
            else:
                module.__dict__.pop("forward", None)


@dataclass
class _Conversion:
    """One conversion of the model: the structure it was made for, its report and the forwards it swaps in."""

    shape: list
    report: ApproxReport
    forwards: list  # (module, _Forward)


_CACHED = 4  # conversions kept per context (a submodule switched between eval and train flips between two)
_CONTEXTS: weakref.WeakSet = weakref.WeakSet()
_STEP_HOOK = None


def _watch_optimizer_steps(ctx: approximate) -> None:
    """Decide the residual joins again after every optimizer step: gamma changes there, and a model compiled
    inside the context does not run the eager check of :class:`_Forward` (torch.compile guards on the decision and
    recompiles when it changes)."""
    global _STEP_HOOK
    _CONTEXTS.add(ctx)
    if _STEP_HOOK is None:
        _STEP_HOOK = _optimizer.register_optimizer_step_post_hook(_after_step)


def _after_step(optimizer, args, kwargs) -> None:
    if torch.compiler.is_compiling():
        return
    for ctx in list(_CONTEXTS):
        for _, rw in ctx._rewritten:
            decide_joins(rw.specs)
        if not ctx._ran and not ctx._warned and _steps_model(optimizer, ctx.model):
            ctx._warned = True
            name = type(ctx.model).__name__
            why = (
                "no converted forward ran since entering"
                if ctx._rewritten
                else "it has no BatchNorm2d unit (see ctx.report())"
            )
            warnings.warn(
                f"tritonact: an optimizer step updated {name}'s parameters, but approximate({name}) stored no code: "
                f"{why}. If training calls a submodule directly (a LightningModule's training_step calling "
                "self.net), enter the context on that module; this step's gradients were computed exactly.",
                NoUnitRan,
                stacklevel=3,
            )


class NoUnitRan(UserWarning):
    """An optimizer step ran on a model inside ``approximate`` whose converted forward never ran."""


def _steps_model(optimizer, model: nn.Module) -> bool:
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return any(id(p) in params for p in model.parameters())


class _Forward:
    _tritonact_forward = True  # rewrite.state.structure: not a user's instance forward
    """The forward of a converted module while the context is open: the rewritten graph in training with autograd
    on, the module's own forward otherwise. A copy (``copy.deepcopy``: EMA / SWA models, Lightning, timm) or a
    pickle (``torch.save(model)``) of the module made inside the context gets the module's own forward, not this
    one: the copy is an ordinary, exact model with its own parameters."""

    def __init__(self, owner: approximate, module: nn.Module, rw: Rewritten | None, prev):
        self.owner, self.module, self.prev = owner, module, prev
        self.gm = rw.gm if rw is not None else None  # None: the module's own forward (under the generic path)
        self.__wrapped__ = prev if prev is not None else types.MethodType(type(module).forward, module)
        self.specs = rw.specs if rw is not None else []
        self.shape: list = []  # structure(module) when it was converted
        self.modules: list = []  # (qualified name, submodule, training, has hooks): what a compiled graph checks
        self.active = True  # False once the context has exited (a reference kept past it runs the module's own)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            if not self.active or not self.module.training or not torch.is_grad_enabled() or self.gm is None:
                return self.__wrapped__(*args, **kwargs)
            # traced by torch.compile: these reads become the compiled graph's guards, so a module replaced,
            # hooked or switched to eval makes it recompile, and the retrace converts the model again
            for path, m, training, hooked in self.modules:
                cur = self.module.get_submodule(path)
                if cur is not m or cur.training != training or has_hooks(cur) != hooked:
                    _rebuild(self.owner)
                    return self.module.forward(*args, **kwargs)
            self.owner._ran = True
            return self.gm(*args, **kwargs)
        if self.active and self.module.training and torch.is_grad_enabled():
            if structure(self.module) != self.shape:  # changed since conversion: convert it as it is now
                self.owner._build()
                return self.module.forward(*args, **kwargs)
            decide_joins(self.specs)
            self.owner._ran = True
            run = self.gm if self.gm is not None else self.__wrapped__
            gen = self.owner._generic
            codes = gen.forward(self.module, args, kwargs) if gen is not None else contextlib.nullcontext()
        else:
            run, codes = self.__wrapped__, contextlib.nullcontext()
        with TRACING.shared(), codes:  # TRACING: no other thread's torch.fx trace (a conversion) sees these calls
            return run(*args, **kwargs)

    def __deepcopy__(self, memo):
        import copy

        if self.prev is not None:  # an instance-level forward the user had set
            return copy.deepcopy(self.prev, memo)
        new = memo.get(id(self.module))  # the copy of the module being made (deepcopy registers it first)
        if new is None:
            raise TypeError("tritonact: a converted forward can only be copied together with its module")
        return types.MethodType(type(self.module).forward, new)

    def __reduce__(self):
        if self.prev is not None:
            return (_identity, (self.prev,))
        return (getattr, (self.module, "forward"))  # at load time: the class's forward, bound


@torch.compiler.disable
def _rebuild(owner: approximate) -> None:
    owner._build()


def _identity(x):
    return x


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _in_forward(model: nn.Module) -> bool:
    mods = {id(m) for m in model.modules()}
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name in ("_call_impl", "forward", "_wrapped_call_impl"):
            s = f.f_locals.get("self")
            if s is not None and id(s) in mods:
                return True
        f = f.f_back
    return False
