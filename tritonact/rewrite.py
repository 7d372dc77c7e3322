"""Finding the fused units in a model's graph and running the rewritten graph.

The model's ``forward`` is traced with ``torch.fx`` (modules with user hooks are kept as calls, so their hooks
fire). The graph is not re-generated as code: a small executor (:class:`Program`) walks its nodes, running fused
ops for the units it found, the model's own modules for everything else, and dropping every value right after
its last use (the ring of ``tritonact.ring`` places those values).
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_arg

from tritonact import ops
from tritonact.config import ApproxConfig
from tritonact.ring import Ring, schedule

# A residual join whose BN has |gamma| below this at entry stores the BN value as a second code instead of
# recovering it from the sum's code (the recovery divides by gamma; zero_init_residual starts at exactly 0).
JOIN_MIN_GAMMA = 0.05


def has_hooks(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)
    )


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
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


@dataclass
class Plan:
    units: dict = field(default_factory=dict)  # final node -> (UnitSpec, y node, residual node | None)
    absorbed: set = field(default_factory=set)  # inner nodes of units (not executed on their own)
    convs: dict = field(default_factory=dict)  # conv node -> module
    pools: dict = field(default_factory=dict)  # pool node -> module
    exact: list = field(default_factory=list)  # (what, why)


def make_plan(gm: fx.GraphModule, cfg: ApproxConfig, backend: str, prefix: str = "") -> Plan:
    modules = dict(gm.named_modules())
    plan = Plan()
    coded: set[fx.Node] = set()
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        name = prefix + node.target
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if type(m) is not nn.BatchNorm2d:
                plan.exact.append((name, f"{type(m).__name__} is not covered (only BatchNorm2d)"))
                continue
            if has_hooks(m):
                plan.exact.append((name, "BatchNorm2d has user hooks"))
                continue
            if node in claimed:
                continue
            final, act, residual, covers = node, "none", None, [name]
            users = list(node.users)
            if len(users) == 1:
                u = users[0]
                k = act_kind(u, modules)
                ops_ = add_operands(u)
                if k and u.args[0] is node:
                    final, act = u, k
                    covers.append(_describe(u, prefix))
                elif ops_ is not None and u not in plan.absorbed:
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
            store_xh = (
                residual is not None and m.weight is not None and bool((m.weight.detach().abs() < JOIN_MIN_GAMMA).any())
            )
            spec = ops.UnitSpec(
                name=name,
                bn=m,
                act=act,
                has_residual=residual is not None,
                config=cfg,
                backend=backend,
                compiled=cfg.effective_compile,
                store_xh=store_xh,
                covers=tuple(covers),
            )
            plan.units[final] = (spec, node.args[0], residual)
            claimed.update({node, final})
            coded.add(final)
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        m = modules[node.target]
        name = prefix + node.target
        src_coded = node.args[0] in coded
        if isinstance(m, nn.Conv2d) or isinstance(m, nn.MaxPool2d):
            why = ops.conv_eligible(m) if isinstance(m, nn.Conv2d) else ops.pool_eligible(m)
            if has_hooks(m):
                why = f"{type(m).__name__} has user hooks"
            if len(node.args) != 1 or node.kwargs:
                why = "called with extra arguments"
            if why is None and src_coded:
                if isinstance(m, nn.Conv2d):
                    plan.convs[node] = m
                else:
                    plan.pools[node] = m
                    coded.add(node)
            elif src_coded:
                plan.exact.append((name, why + "; saves its full-precision input"))
    return plan


def _describe(node: fx.Node, prefix: str) -> str:
    if node.op == "call_module":
        return prefix + str(node.target)
    return getattr(node.target, "__name__", str(node.target))


class Program:
    """Runs a traced graph with the plan's fused ops, dropping each value after its last use."""

    def __init__(
        self,
        root: nn.Module,
        gm: fx.GraphModule,
        plan: Plan,
        signature: inspect.Signature,
        use_ring: bool | None = None,
    ):
        self.root, self.plan, self.signature = root, plan, signature
        self.modules = dict(gm.named_modules())
        self.steps = []
        self.placeholders = []
        self.output_args = None
        reads_per_step = []
        for node in gm.graph.nodes:
            if node in plan.absorbed:
                continue
            if node.op == "placeholder":
                self.placeholders.append(node)
                continue
            if node.op == "output":
                self.output_args = node.args[0]
                reads = _nodes_in(node.args)
                reads_per_step.append(reads)
                self.steps.append(("output", node, None))
                continue
            if node in plan.units:
                spec, y, res = plan.units[node]
                self.steps.append(("unit", node, (spec, y, res)))
                reads_per_step.append([y] + ([res] if res is not None else []))
            elif node in plan.convs:
                self.steps.append(("conv", node, plan.convs[node]))
                reads_per_step.append([node.args[0]])
            elif node in plan.pools:
                self.steps.append(("pool", node, plan.pools[node]))
                reads_per_step.append([node.args[0]])
            else:
                self.steps.append((node.op, node, None))
                reads_per_step.append(_nodes_in((node.args, node.kwargs)))
        last = {}
        for i, reads in enumerate(reads_per_step):
            for n in reads:
                last[n] = i
        self.frees = [[] for _ in self.steps]
        for n, i in last.items():
            self.frees[i].append(n)
        self.last_use = last
        self.use_ring = use_ring  # None: on for CUDA inputs only
        self.ring_plan = schedule(self.steps, last, plan, self.modules) if use_ring is not False else None
        self.ring = Ring(self.ring_plan.nslots) if self.ring_plan is not None else None

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        env: dict = {}
        codes: dict = {}
        for ph in self.placeholders:
            env[ph] = bound.arguments[ph.target.lstrip("*")]
        get = env.__getitem__
        result = None
        ring = self.ring
        if ring is not None and self.use_ring is None:
            first = next((v for v in env.values() if isinstance(v, torch.Tensor)), None)
            if first is None or first.device.type != "cuda":
                ring = None
        for (kind, node, extra), frees in zip(self.steps, self.frees):
            if kind == "unit":
                spec, y, res = extra
                slot = self.ring_plan.slot_of.get(node) if ring is not None else None
                out, code = ops.bn_act(spec, env[y], env[res] if res is not None else None, codes.get(res), ring, slot)
                env[node] = out
                if code is not None:
                    codes[node] = code
            elif kind == "conv":
                env[node] = ops.conv_coded(extra, env[node.args[0]], codes.get(node.args[0]), ring)
            elif kind == "pool":
                out, code = ops.maxpool_coded(extra, env[node.args[0]], codes.get(node.args[0]))
                env[node] = out
                if code is not None:
                    codes[node] = code
            elif kind == "call_module":
                env[node] = self.modules[node.target](*map_arg(node.args, get), **map_arg(node.kwargs, get))
            elif kind == "call_function":
                env[node] = node.target(*map_arg(node.args, get), **map_arg(node.kwargs, get))
            elif kind == "call_method":
                self_obj, *rest = map_arg(node.args, get)
                env[node] = getattr(self_obj, node.target)(*rest, **map_arg(node.kwargs, get))
            elif kind == "get_attr":
                env[node] = _fetch_attr(self.root, node.target)
            elif kind == "output":
                result = map_arg(self.output_args, get)
            for n in frees:
                env.pop(n, None)
                codes.pop(n, None)
        return result


def _nodes_in(a) -> list:
    found = []
    map_arg(a, found.append)
    return found


def _fetch_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def trace(module: nn.Module) -> fx.GraphModule:
    """Trace ``module`` in training mode (restoring every submodule's mode after)."""
    modes = {m: m.training for m in module.modules()}
    try:
        module.train()
        tracer = _Tracer()
        graph = tracer.trace(module)
        return fx.GraphModule(tracer.root, graph)
    finally:
        for m, t in modes.items():
            m.training = t
