"""Finding the fused units in a model's traced graph (the plan that :mod:`tritonact.rewrite.codegen` turns into
a new graph).

The model's ``forward`` is traced with ``torch.fx`` (modules with user hooks are kept as calls, so their hooks
fire). A unit is a ``BatchNorm2d`` with, optionally, the residual add and the ReLU / ReLU6 after it; the plain
convolutions and max-pools that read a unit's output consume its code.
"""

from __future__ import annotations

import math
import operator
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import fx, nn

from tritonact.config import DEFAULT_WINDOW, ApproxConfig
from tritonact.reference import R

# A residual join whose BN has a |gamma| below this stores the BN value as a second code instead of recovering it
# from the sum's code (the recovery divides by gamma; zero_init_residual starts at exactly 0, weight decay shrinks
# gamma during training). Decided again from the current gamma before every training forward
# (:func:`decide_joins`), so a gamma that decays after entry switches its join to the second code.
JOIN_MIN_GAMMA = 0.05

# With ApproxConfig(join_codes="auto"), a join also stores its BN value's own code when the sum's grid, divided by
# |gamma| (the recovery's error scale), spans more than this many times the window a code of the BN value itself
# would span (2 * min(window, 4) standard deviations). Measured on resnet152 at init (4 bits, batch 4, 64x64):
# joins above 1.7x: 21 of 50, conv gradient median error 0.197 -> 0.145; above 1.43x: 28, 0.142; above 1.14x:
# 41, 0.140; all 50: 0.128. resnet18 and resnet50 at init stay below 1.32x everywhere at 4 and 8 bits (no second
# code); at 2 bits (window 2) most of resnet50's joins are above it.
JOIN_MAX_SPREAD = 1.4
# With join_codes "few" (the default) and "auto", at every width, a join whose BN sees at most this many values per
# channel (batch x height x width) stores the second code too: at init the variance term's share of the BN's input
# gradient falls like 1/sqrt(values), so it weighs most there, and the second code of so few values costs little.
# Measured (4 bits, 8 x 64x64, seeds 0-2; layer3 sees 128 values per channel, layer4 32): second codes at layer4's
# joins / layer3's and layer4's / every join: resnet50 0.1068 -> 0.1020 / 0.1009 / 0.1007 (layer1's and layer2's,
# 2048 and 512 values, change nothing); resnet152 0.1483 -> 0.1453 / 0.0986 / 0.0986. At 128x128 (layer3 512
# values) resnet50's layer3 joins gain 0.0014 only, resnet152's 0.020 (its sum spreads: join_codes="auto" takes
# those).
JOIN_FEW_VALUES = 256


def has_hooks(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)
    )


CHECKPOINTS = (torch.utils.checkpoint.checkpoint, torch.utils.checkpoint.checkpoint_sequential)


class _Tracer(fx.Tracer):
    """Modules with user hooks stay calls (their hooks fire); so do ``torch.utils.checkpoint`` calls: the region
    is recomputed in backward as the user asked, exactly, with BN statistics updated as PyTorch does.

    While it traces, torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` for every thread; a module called
    by another thread meanwhile runs as usual instead of being recorded into this graph."""

    def __init__(self):
        super().__init__(autowrap_modules=(math, torch.utils.checkpoint))
        self._thread = threading.get_ident()

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # every BatchNorm (subclasses too: timm's BatchNormAct2d) stays a call: tracing through one would run its
        # buffer update once at trace time (num_batches_tracked.add_ on the real buffer) and never again
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and qualname != "":
            return True
        # a LayerNorm / GroupNorm subclass (torchvision's LayerNorm2d) too: called as a module, the generic path
        # sees which module saves its input (tritonact.saved.COARSE: bits-bit, not 8-bit, codes)
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and qualname != "":
            return True
        return super().is_leaf_module(m, qualname) or (has_hooks(m) and qualname != "")


_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None)}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}


def act_kind(node: fx.Node, modules: dict) -> str | None:
    """``"relu"`` / ``"relu6"`` if ``node`` applies that activation to its first argument, else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if has_hooks(m) or len(node.args) != 1 or node.kwargs:
            return None
        if type(m) is nn.ReLU:
            return "relu"
        if type(m) is nn.ReLU6 or (type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0):
            return "relu6"
        return None
    extra = set(node.kwargs) - {"inplace"}
    if node.op == "call_function" and not extra:
        if node.target in _RELU_FUNCS and len(node.args) in (1, 2):
            return "relu"
        if node.target is F.relu6 and len(node.args) in (1, 2):
            return "relu6"
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not extra:
        return "relu"
    return None


_NORM_ACTS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Identity: "none"}


def is_norm_act(m: nn.Module) -> bool:
    """Whether ``m`` is a norm-plus-activation module of the kind timm builds its models from (``BatchNormAct2d``:
    a ``BatchNorm2d`` whose forward is BatchNorm2d's, then ``self.drop``, then ``self.act``), with no drop."""
    return (
        isinstance(m, nn.BatchNorm2d)
        and type(m).__name__ == "BatchNormAct2d"
        and isinstance(getattr(m, "drop", None), nn.Identity)
        and isinstance(getattr(m, "act", None), nn.Module)
        and not has_hooks(m.act)
    )


def add_operands(node: fx.Node) -> tuple | None:
    """The two tensor operands of a plain ``a + b`` node, else None."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a is not b:
        return a, b
    return None


@dataclass(eq=False)
class UnitSpec:
    """One fused unit of the rewritten model: which modules it covers and how it codes its output."""

    name: str
    bn: nn.BatchNorm2d
    act: str  # "relu" | "relu6" | "none"
    has_residual: bool
    backend: str = "torch"  # the backend it was converted for (tritonact.backends)
    store_xh: bool = False  # residual join whose BN value is stored as a second code (some |gamma| ~ 0 now)
    two_codes: bool = False  # a residual join that always stores the second code (ApproxConfig.join_codes=2)
    few_codes: bool = False  # a join that stores it where it sees few values per channel (join_codes "few", "auto")
    spread_codes: bool = False  # ... or where its sum spread in the last forward (join_codes="auto", 4 and 8 bits)
    last_two_codes: bool = field(default=False, repr=False)  # whether the last eager training forward stored xh
    xh_extent: float = 8.0  # the window a code of its BN value would span, in standard deviations
    last_P: torch.Tensor | None = field(default=None, repr=False)  # the sum's grid in the last training forward
    bits: int | None = None  # its code width where it differs from the context's (see make_plan)
    post: nn.Module | None = None  # a norm-plus-activation module's activation, called on the unit's output
    edge: float = -1.0  # >= 0: its output is read by an activation whose derivative jumps at +-edge (_edge_of)
    covers: tuple[str, ...] = ()
    last_code_bytes: int = field(default=0, repr=False)  # of the last eager training forward
    last_full_bytes: int = field(default=0, repr=False)


def decide_joins(specs: list) -> None:
    """Set ``store_xh`` of every residual-join unit in ``specs``: always with ``two_codes``; else where some
    ``|gamma|`` is below ``JOIN_MIN_GAMMA``, or (``spread_codes``) where the last forward's sum grid divided by
    ``|gamma|`` spans more than ``JOIN_MAX_SPREAD`` times ``xh_extent`` (median over channels). A few small
    reductions per join and one host read for all of them."""
    for s in specs:
        if s.two_codes:
            s.store_xh = True
    joins = [s for s in specs if s.has_residual and s.bn.weight is not None and not s.two_codes]
    if not joins:
        return
    with torch.no_grad():
        gammas = [s.bn.weight.detach().abs() for s in joins]
        flags = torch.stack([g.amin() for g in gammas]) < JOIN_MIN_GAMMA
        auto = [
            i for i, (s, g) in enumerate(zip(joins, gammas))
            if s.spread_codes and s.last_P is not None and s.last_P.shape[1] == g.shape[0]
        ]  # fmt: skip
        if auto:
            wide = torch.stack(
                [_spread(joins[i].last_P, gammas[i]) > JOIN_MAX_SPREAD * joins[i].xh_extent for i in auto]
            )
            flags[auto] |= wide
        flags = flags.tolist()
    for s, flag in zip(joins, flags):
        s.store_xh = flag


def _spread(P: torch.Tensor, gamma_abs: torch.Tensor) -> torch.Tensor:
    """Median over channels of the range a sum grid ``P`` covers, divided by ``|gamma|``."""
    extent = P[R["dp"]] * (P[R["qtop"]] - P[R["nneg"]] + 1) + P[R["dn"]] * P[R["nneg"]]
    return (extent / gamma_abs.to(extent.dtype)).median()


def conv_eligible(conv: nn.Module) -> str | None:
    """None if the conv can consume codes, else why not."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    return None


def pool_eligible(pool: nn.Module) -> str | None:
    if type(pool) is not nn.MaxPool2d:
        return f"{type(pool).__name__} is not nn.MaxPool2d"
    if pool.return_indices:
        return "return_indices=True"
    k = pair(pool.kernel_size)
    if k[0] * k[1] > 256:
        return f"kernel {k} has more than 256 positions"
    return None


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass
class Plan:
    backend: str = "torch"  # of every call site (tritonact.backends)
    units: dict = field(default_factory=dict)  # final node -> (UnitSpec, y node, residual node | None)
    absorbed: set = field(default_factory=set)  # inner nodes of units (not executed on their own)
    convs: dict = field(default_factory=dict)  # conv node -> module
    pools: dict = field(default_factory=dict)  # pool node -> module
    exact: list = field(default_factory=list)  # (what, why)
    stems: dict = field(default_factory=dict)  # pool node -> (conv node, unit node): one tritonact::stem call


def make_plan(gm: fx.GraphModule, cfg: ApproxConfig, backend: str, prefix: str = "") -> Plan:
    modules = dict(gm.named_modules())
    _drop_identities(gm, modules)
    plan = Plan(backend=backend)
    coded: set[fx.Node] = set()
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in CHECKPOINTS:
            fn = node.args[0] if node.args else None
            what = prefix + fn.target if isinstance(fn, fx.Node) and fn.op == "get_attr" else f"{prefix}{node.name}"
            plan.exact.append((what, f"inside {node.target.__name__}: recomputed in backward, runs exactly"))
        if node.op != "call_module":
            continue
        m = modules[node.target]
        name = prefix + node.target
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            norm_act = is_norm_act(m)
            if type(m) not in (nn.BatchNorm2d, nn.SyncBatchNorm) and not norm_act:
                why = f"{type(m).__name__} is not covered (BatchNorm2d, SyncBatchNorm and BatchNormAct2d are)"
                plan.exact.append((name, why))
                continue
            if has_hooks(m):
                plan.exact.append((name, f"{type(m).__name__} has user hooks"))
                continue
            if node in claimed:
                continue
            final, act, residual, covers, post = node, "none", None, [name], None
            users = list(node.users)
            if norm_act:  # its activation runs inside the module: in the unit, or as a call on the unit's output
                act = _NORM_ACTS.get(type(m.act))
                if act is None:
                    act, post = "none", m.act
                covers.append(f"{name}.act ({type(m.act).__name__})")
                users = []
            if len(users) == 1:
                u = users[0]
                k = act_kind(u, modules)
                ops_ = add_operands(u)
                if k and u.args[0] is node:
                    final, act = u, k
                    covers.append(_describe(u, prefix))
                elif ops_ is not None and u not in plan.absorbed and u not in claimed:
                    other = ops_[1] if ops_[0] is node else ops_[0]
                    nxt = list(u.users)
                    k2 = act_kind(nxt[0], modules) if len(nxt) == 1 else None
                    if k2 and nxt[0].args[0] is u:
                        final, act = nxt[0], k2
                        covers += ["add", _describe(nxt[0], prefix)]
                        plan.absorbed.add(u)
                    else:
                        final = u
                        covers.append("add")
                    residual = other
            if final is not node:
                plan.absorbed.add(node)
            spec = UnitSpec(
                name=name,
                bn=m,
                act=act,
                has_residual=residual is not None,
                backend=backend,
                two_codes=residual is not None and cfg.join_codes == 2,
                few_codes=residual is not None and cfg.join_codes in ("few", "auto"),
                spread_codes=residual is not None and cfg.join_codes == "auto",
                covers=tuple(covers),
                post=post,
            )
            plan.units[final] = (spec, node.args[0], residual)
            claimed.update({node, final})
            if post is None:  # else its output is post(unit output), which no code describes
                coded.add(final)
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        m = modules[node.target]
        name = prefix + node.target
        src_coded = node.args[0] in coded
        if isinstance(m, nn.Conv2d) or isinstance(m, nn.MaxPool2d):
            why = conv_eligible(m) if isinstance(m, nn.Conv2d) else pool_eligible(m)
            if has_hooks(m):
                why = f"{type(m).__name__} has user hooks"
            if len(node.args) != 1 or node.kwargs:
                why = "called with extra arguments"
            if why is None and isinstance(m, nn.MaxPool2d) and node.args[0] in plan.pools:
                why = "reads another max-pool's output (a code carries one pool)"
            if why is None and src_coded:
                if isinstance(m, nn.Conv2d):
                    plan.convs[node] = m
                else:
                    plan.pools[node] = m
                    coded.add(node)
            elif src_coded:
                plan.exact.append((name, why + "; saves its full-precision input"))
    if cfg.generic and not cfg.naive and cfg.bits < 8:
        from tritonact.saved import COARSE

        # A unit output read by an op whose input gradient reads the value (a SiLU, a Hardswish, a gate multiply)
        # is coded at 8 bits; the generic path then keeps that one code for the op too, instead of a second one.
        for final, (spec, _, _) in plan.units.items():
            post_fine = spec.post is not None and not isinstance(spec.post, COARSE)
            if post_fine or any(_reads_for_gradient(u, final, plan, modules) for u in final.users):
                spec.bits = 8
    for final, (spec, _, _) in plan.units.items():
        if spec.act == "none" and cfg.generic and not cfg.naive:  # (else the activation keeps its own input)
            spec.edge = max([_edge_of(spec.post, None, modules)] + [_edge_of(None, u, modules) for u in final.users])
    for spec, _, _ in plan.units.values():
        bits = spec.bits or cfg.bits
        window = cfg.effective_window if bits == cfg.bits else DEFAULT_WINDOW[bits]
        spec.xh_extent = 2 * min(window, 4.0)  # a standardized value's grid spans at most about +-4 (8 bits: min/max)
        # (at 2 bits the sum's grid must reach the threshold while a BN value's spans +-2: the rule would take most
        # joins of resnet50, docs/method.md section 3)
        spec.spread_codes = spec.spread_codes and bits > 2
    decide_joins([spec for spec, _, _ in plan.units.values()])
    if not prefix and not cfg.naive:
        _find_stems(plan, modules)
    return plan


def _find_stems(plan: Plan, modules: dict) -> None:
    """The convolutions of a graph input whose output one unit alone reads, whose output one max-pool alone reads
    (``Plan.stems``): the convolution keeps its input in full anyway, so the unit's backward can compute its BN
    input again instead of keeping a code (``tritonact.ops.stem``)."""
    for final, (spec, y, res) in plan.units.items():
        users = list(final.users)
        if res is not None or spec.post is not None or len(users) != 1:
            continue
        pool = users[0]
        if pool not in plan.pools or pool.args[0] is not final or y.op != "call_module" or len(y.users) != 1:
            continue
        conv = modules[y.target]
        if (
            not isinstance(conv, nn.Conv2d)
            or conv_eligible(conv) is not None
            or has_hooks(conv)
            or len(y.args) != 1
            or y.kwargs
            or not isinstance(y.args[0], fx.Node)
            or y.args[0].op != "placeholder"
        ):
            continue
        plan.stems[pool] = (y, final)


# Activations whose derivative jumps: at +-3 (Hardswish: 0 -> -0.5 at -3, 1.5 -> 1 at 3; Hardsigmoid: 0 <-> 1/6), at
# 0 (LeakyReLU, PReLU: 1 <-> the slope; SELU). A unit whose output they read puts bin edges there
# (reference.code_params), so the code never carries a value across a jump: the derivative's region is exact, as a
# ReLU's mask is. Measured (8 bits, 8 x 64x64, conv weight gradient median): timm mobilenetv3_large_100 0.044 ->
# 0.014 (with plain grids the error went as the square root of the step, 0.0445 / 0.0303 / 0.0229 at 256 / 512 /
# 1024 levels: rare large errors at the jumps); resnet18 with LeakyReLU(0.1) 0.137 -> see tests/test_edges.py.
_EDGES = {nn.Hardswish: 3.0, nn.Hardsigmoid: 3.0, nn.LeakyReLU: 0.0, nn.PReLU: 0.0, nn.SELU: 0.0}
_EDGE_FUNCTIONS = {F.hardswish: 3.0, F.hardsigmoid: 3.0, F.leaky_relu: 0.0, F.prelu: 0.0, F.selu: 0.0}


def _edge_of(post: nn.Module | None, user: fx.Node | None, modules: dict) -> float:
    """Where ``post`` or the node ``user`` is such an activation, the ``edge`` its jumps need, else -1.0."""
    if user is None:
        return _EDGES.get(type(post), -1.0)
    if user.op == "call_module":
        return _EDGES.get(type(modules.get(user.target)), -1.0)
    return _EDGE_FUNCTIONS.get(user.target, -1.0) if user.op == "call_function" else -1.0


def _drop_identities(gm: fx.GraphModule, modules: dict) -> None:
    """Remove the calls of ``nn.Identity`` modules (no hooks) from the traced graph: timm puts a disabled drop-block
    between a BN and its ReLU and an anti-aliasing placeholder before a conv; as calls they would split units."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        m = modules.get(node.target)
        if type(m) is nn.Identity and not has_hooks(m) and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _reads_for_gradient(user: fx.Node, node: fx.Node, plan, modules) -> bool:
    from tritonact.ring import reader_is_safe
    from tritonact.saved import COARSE

    why = reader_is_safe(user, node, plan, modules)
    if why is None or not why.startswith("read by"):
        return False
    if user.op == "call_module" and isinstance(modules[user.target], nn.Hardtanh):  # codes its own (saturation)
        return False
    return not (user.op == "call_module" and isinstance(modules[user.target], COARSE))


def _describe(node: fx.Node, prefix: str) -> str:
    if node.op == "call_module":
        return prefix + str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def trace(module: nn.Module, train_all: bool = True) -> fx.GraphModule:
    """Trace ``module`` as it runs in training: every submodule in training mode (``train_all``; the modes are
    restored after), or each in the mode it has now."""
    modes = {m: m.training for m in module.modules()}
    try:
        if train_all:
            module.train()
        tracer = _Tracer()
        graph = tracer.trace(module)
        for node in graph.nodes:
            # an autowrapped call (torch.utils.checkpoint) would make fx's code generation register its qualified
            # name for wrapping in every later trace, where that name cannot be found (KeyError)
            node.meta.pop("is_wrapped", None)
        return fx.GraphModule(tracer.root, graph)
    finally:
        for m, t in modes.items():
            m.training = t
