"""``tritonact.approximate``: the context manager that turns a model's backward pass approximate."""

from __future__ import annotations

import sys
import types
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.optim.optimizer as _optimizer
from torch import nn

from tritonact.config import ApproxConfig
from tritonact.rewrite import Rewritten, generate, has_hooks, make_plan, trace
from tritonact.rewrite.calls import backend_name
from tritonact.rewrite.plan import decide_joins
from tritonact.rewrite.state import TRACING, structure
from tritonact.ring import reader_is_safe

__all__ = ["approximate", "ApproxReport", "NoUnitRan"]

_ACTIVE: weakref.WeakSet = weakref.WeakSet()


@dataclass
class ApproxReport:
    """What ``approximate`` did to a model: fused units, code-consuming convs/pools, and what was left exact."""

    bits: int
    units: list = field(default_factory=list)  # UnitSpec
    coded_convs: list = field(default_factory=list)  # names
    coded_pools: list = field(default_factory=list)
    exact: list = field(default_factory=list)  # (what, why)
    ring_kept_out: list = field(default_factory=list)  # (unit, why its output is not in the ring)
    rewritten: list = field(default_factory=list, repr=False)  # (prefix, Rewritten)
    ring_on: bool = False  # the ring is used at run time (ring=True, or the default on CUDA)

    @property
    def ring_slots(self) -> int:
        """Slots of the ring(s): the most unit outputs alive at once (summed over separately converted parts)."""
        return sum(r.ring_plan.nslots for _, r in self.rewritten if r.ring_plan is not None)

    @property
    def ring_bytes(self) -> int:
        """Bytes the ring buffers hold now (allocated on first use, grown with the batch)."""
        return sum(r.ring.nbytes for _, r in self.rewritten if r.ring is not None)

    @property
    def graph_modules(self) -> list:
        """The generated ``torch.fx.GraphModule`` of each converted part, as ``(prefix, GraphModule)``."""
        return [(prefix, r.gm) for prefix, r in self.rewritten]

    @property
    def code_bytes(self) -> int:
        """Bytes of codes the last training forward stored (all units)."""
        return sum(u.last_code_bytes for u in self.units)

    @property
    def full_bytes(self) -> int:
        """Bytes the same activations take in full precision."""
        return sum(u.last_full_bytes for u in self.units)

    def __str__(self) -> str:
        def n(k, what):
            return f"{k} {what}{'' if k == 1 else 's'}"

        lines = [
            f"tritonact: {n(len(self.units), 'fused unit')} at {self.bits} bits, {n(len(self.coded_convs), 'conv')} "
            f"and {n(len(self.coded_pools), 'max-pool')} consume codes"
        ]
        if self.full_bytes:
            lines.append(
                f"last forward: {self.code_bytes / 2**20:.2f} MiB of codes for {self.full_bytes / 2**20:.2f} MiB "
                f"of activations ({self.full_bytes / max(self.code_bytes, 1):.1f}x less)"
            )
        lines.append(f"{'unit':<40} {'covers':<48} {'codes MiB':>9}")
        for u in self.units:
            join = " (2 codes)" if u.store_xh else ""
            lines.append(f"{u.name:<40} {' + '.join(u.covers) + join:<48} {u.last_code_bytes / 2**20:>9.3f}")
        planned = any(r.ring_plan is not None for _, r in self.rewritten)
        if planned and not self.ring_on:
            lines.append(f"ring: off on CPU by default ({self.ring_slots} slots planned; ApproxConfig(ring=True))")
        elif planned:
            lines.append(f"ring: {self.ring_slots} slots, {self.ring_bytes / 2**20:.2f} MiB held")
            for what, why in self.ring_kept_out:
                lines.append(f"  kept out of the ring: {what}: {why}")
        else:
            lines.append("ring: off")
        if self.exact:
            lines.append("left exact:")
            lines += [f"  {what}: {why}" for what, why in self.exact]
        return "\n".join(lines)


class approximate:
    """Exact forward, k-bit activations for backward, for every BN(+add)+ReLU unit of ``model``.

    Args:
        model: the ``nn.Module`` to train; it is not re-created or copied, only its ``forward`` is swapped
            while the context is open (restored on exit, also after an exception).
        bits: 2, 4 or 8.
        naive: quantize inside the forward pass instead (a baseline whose error compounds with depth).
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA tensors, torch on CPU).
        window, positive_fraction, ring, compile: see :class:`tritonact.ApproxConfig`.

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
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        given = {
            k: v
            for k, v in dict(bits=bits, naive=naive, backend=backend, window=window,
                             positive_fraction=positive_fraction, ring=ring, compile=compile).items()
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
        _watch_optimizer_steps(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        for conv in self._cache:
            for _, rw in conv.report.rewritten:
                if rw.ring is not None:
                    rw.ring.release()
        self._cache.clear()
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
            on = ring is True or (ring is None and _model_device(self.model).type == "cuda")
            self._report = ApproxReport(bits=self.config.bits, ring_on=on)
            self._rewritten = self._report.rewritten
            with TRACING.exclusive():
                self._convert(self.model, "", self._backend, train_all)
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
                if any(isinstance(m, torch.nn.BatchNorm2d) for m in child.modules()):
                    self._convert(child, f"{prefix}{name}.", backend, train_all)
            return
        plan = make_plan(gm, self.config, backend, prefix)
        rep = self._report
        rep.exact += _kept_in_full(gm, plan)
        rep.units += [spec for spec, _, _ in plan.units.values()]
        rep.coded_convs += [prefix + n.target for n in plan.convs]
        rep.coded_pools += [prefix + n.target for n in plan.pools]
        rep.exact += plan.exact
        if plan.units:
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
        elif not prefix:
            rep.exact.append((type(module).__name__, "no BatchNorm2d unit found: the whole model runs exactly"))
        # modules kept as calls because they have hooks: convert their insides separately
        for node in gm.graph.nodes:
            if node.op == "call_module":
                sub = gm.get_submodule(node.target)
                if has_hooks(sub) and any(isinstance(m, torch.nn.BatchNorm2d) for m in sub.modules()):
                    if not isinstance(sub, torch.nn.BatchNorm2d):
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


def _kept_in_full(gm, plan) -> list:
    """``(what, why)`` for each unit whose output a consumer that is not code-aware may save in full for backward
    (an activation outside the unit, a view, a linear layer): its code does not replace it there."""
    modules = dict(gm.named_modules())
    out = []
    for node, (spec, _, _) in plan.units.items():
        for user in node.users:
            why = reader_is_safe(user, node, plan, modules)
            if why is not None and why.startswith("read by"):
                out.append((f"{spec.name} output", f"also kept in full: {why}"))
                break
    return out


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

    def __init__(self, owner: approximate, module: nn.Module, rw: Rewritten, prev):
        self.owner, self.module, self.gm, self.prev = owner, module, rw.gm, prev
        self.__wrapped__ = prev if prev is not None else types.MethodType(type(module).forward, module)
        self.specs = rw.specs
        self.shape: list = []  # structure(module) when it was converted
        self.modules: list = []  # (qualified name, submodule, training, has hooks): what a compiled graph checks
        self.active = True  # False once the context has exited (a reference kept past it runs the module's own)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            if not self.active or not self.module.training or not torch.is_grad_enabled():
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
            run = self.gm
        else:
            run = self.__wrapped__
        with TRACING.shared():  # no other thread's torch.fx trace (a conversion) sees these module calls
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
