"""The rewritten model: a generated ``torch.fx.GraphModule`` whose nodes call the plan's units.

Every node of the traced graph is copied, except that a unit's nodes (BN, add, activation) become one call of a
:class:`~tritonact.rewrite.calls.Unit`, and the convolutions and max-pools that read a unit's output become calls
that also take its code. The GraphModule shares the user's very modules, parameters and buffers; fx's code
generation frees every value after its last use, so a full-precision activation lives only until its consumers
have run. Ring slots (:mod:`tritonact.ring`) are assigned per unit output.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_arg

from tritonact import saved
from tritonact.config import ApproxConfig
from tritonact.ops.fork import fork
from tritonact.rewrite.calls import CodedConv, CodedPool, Stem, Unit
from tritonact.rewrite.plan import Plan, has_hooks
from tritonact.ring import Ring, RingPlan, schedule

__all__ = ["Rewritten", "generate", "derives"]


@dataclass
class Rewritten:
    """A converted module: its generated graph, the plan it came from and its ring (or None)."""

    gm: fx.GraphModule
    plan: Plan
    ring_plan: RingPlan | None
    ring: Ring | None

    @property
    def specs(self) -> list:
        return [spec for spec, _, _ in self.plan.units.values()]


def _reads(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    map_arg((node.args, node.kwargs), found.append)
    return found


def _ring_plan(gm: fx.GraphModule, plan: Plan) -> RingPlan:
    steps, reads = [], []
    in_stems = {final for _, final in plan.stems.values()}  # (their output lives inside tritonact::stem)
    for node in gm.graph.nodes:
        if node in plan.absorbed or node.op == "placeholder":
            continue
        if node in plan.units and node not in in_stems:
            spec, y, res = plan.units[node]
            steps.append(("unit", node, (spec, y, res)))
            reads.append([y] + ([res] if res is not None else []))
        else:
            steps.append((node.op, node, None))
            reads.append(_reads(node))
    last = {n: i for i, rs in enumerate(reads) for n in rs}
    return schedule(steps, last, plan, dict(gm.named_modules()))


_OUT_OF_PLACE = {nn.SiLU: F.silu, nn.Hardswish: F.hardswish, nn.Hardsigmoid: F.hardsigmoid, nn.Mish: F.mish}


def _out_of_place(node: fx.Node, plan: Plan, modules):
    """The functional, out-of-place form of an in-place activation module that is a unit output's only reader."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    m, x = modules.get(node.target), node.args[0]
    f = _OUT_OF_PLACE.get(type(m))
    if f is None or not getattr(m, "inplace", False) or x not in plan.units or len(x.users) != 1:
        return None
    return None if (m._forward_hooks or m._forward_pre_hooks) else f


_DERIVED_MODULES = {nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Mish: "mish"}
_DERIVED_FUNCTIONS = {F.silu: "silu", F.hardswish: "hardswish", F.mish: "mish", F.gelu: "gelu"}
_GELU = {"none": "gelu", "tanh": "gelu_tanh"}


def _derived_kind(m, fn=None, kwargs=None) -> str | None:
    """The ``saved.DERIVED`` kind of an out-of-place activation call (module ``m`` without hooks, or function
    ``fn`` with ``kwargs``) whose output is exactly that function of its one input, else None."""
    if m is not None:
        if has_hooks(m) or getattr(m, "inplace", False):
            return None
        return _GELU.get(m.approximate) if type(m) is nn.GELU else _DERIVED_MODULES.get(type(m))
    kind = _DERIVED_FUNCTIONS.get(fn)
    kwargs = dict(kwargs or {})
    if kind == "gelu":
        kind = _GELU.get(kwargs.pop("approximate", "none"))
    elif kwargs.pop("inplace", False):
        return None
    return None if kwargs else kind


def _derivable(node: fx.Node, modules) -> str | None:
    if len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module" and not node.kwargs:
        return _derived_kind(modules.get(node.target))
    if node.op == "call_function":
        return _derived_kind(None, node.target, node.kwargs)
    return None


def _is_product(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in (operator.mul, torch.mul)
        and len(node.args) == 2
        and not node.kwargs
        and all(isinstance(a, fx.Node) for a in node.args)
    )


def derives(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls an activation whose saved output the generic path would derive (a graph worth generating
    without units)."""
    modules = dict(gm.named_modules())
    return any(_derivable(node, modules) for node in gm.graph.nodes)


def _sole_conv_output(y: fx.Node, modules) -> bool:
    """Whether ``y`` is the output of a plain ``nn.Conv2d`` call (which keeps nothing of its output, and has no
    hooks that could) read by nothing but one BN: a join may then write its output into ``y``'s buffer."""
    if y.op != "call_module" or len(y.users) != 1 or len(y.args) != 1 or y.kwargs:
        return False
    m = modules.get(y.target)
    return isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward and not has_hooks(m)


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fork_shared(graph: fx.Graph, modules, values) -> None:
    """Split each value read by several of tritonact's calls (a ResNet block input: the block's first conv and its
    residual) into one alias per reader (``tritonact.ops.fork``). Where the first reader is a convolution, it makes
    the aliases and its backward adds its input gradient into the others' a few samples at a time; otherwise their
    gradients are summed in place. Autograd's own sum would be out of place inside a dispatch mode (MemTracker), a
    third activation-sized gradient at the backward's peak."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    ours = (CodedConv, CodedPool, Unit)
    for v in values:
        readers = sorted(v.users, key=order.__getitem__)
        if len(readers) < 2 or not all(r.op == "call_module" and isinstance(modules[r.target], ours) for r in readers):
            continue
        first = readers[0]
        if isinstance(modules[first.target], CodedConv) and first.args[0] is v and v not in first.args[1:]:
            with graph.inserting_after(first):
                made = graph.call_module(first.target, first.args, {"aliases": len(readers) - 1})
            with graph.inserting_after(made):
                out = graph.call_function(operator.getitem, (made, 0))
            first.replace_all_uses_with(out)
            graph.erase_node(first)
            others, at = readers[1:], out
        else:
            with graph.inserting_after(v):
                made = at = graph.call_function(fork, (v, len(readers)))
            others = readers
        for i, r in enumerate(others, start=1 if made is not at else 0):
            with graph.inserting_after(at):
                at = graph.call_function(operator.getitem, (made, i))
            r.replace_input_with(v, at)


def _hoist_residual_branches(graph: fx.Graph, modules) -> None:
    """Run each join's residual branch (a downsample conv and its BN unit) as soon as its inputs exist instead of
    right before the join. Traced in the model's order the branch runs after the main branch, while the main
    branch's last output waits for the join: at a ResNet stage's first block that is three output-sized tensors
    alive at once (conv3's output, the downsample conv's and its BN's). Hoisted, the residual waits instead, and the
    block input dies earlier. Only tritonact's own calls move (no hooks, no randomness: the same values)."""
    movable = (CodedConv, CodedPool, Unit)

    def user_module(n: fx.Node):
        m = modules[n.target]
        return (
            m.bn
            if isinstance(m, Unit)
            else m.conv
            if isinstance(m, CodedConv)
            else m.pool
            if isinstance(m, CodedPool)
            else m
        )

    uses: dict[int, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            uses[id(user_module(n))] = uses.get(id(user_module(n)), 0) + 1

    def ours(n: fx.Node) -> bool:
        if n.op == "call_function":
            return n.target is operator.getitem
        # a module called twice (shared weights) keeps its calls' order: its running statistics depend on it
        return n.op == "call_module" and isinstance(modules[n.target], movable) and uses[id(user_module(n))] == 1

    for join in list(graph.nodes):
        if join.op != "call_module" or not isinstance(modules[join.target], Unit) or "residual" not in join.kwargs:
            continue
        ends = [n for n in (join.kwargs["residual"], join.kwargs.get("res_code")) if isinstance(n, fx.Node)]
        if not all(ours(n) and set(n.users) == {join} for n in ends):
            continue
        branch, grew = set(ends), True
        while grew:  # the ancestors that feed nothing but the branch
            grew = False
            for n in list(branch):
                for a in _reads(n):
                    if a not in branch and ours(a) and set(a.users) <= branch:
                        branch.add(a)
                        grew = True
        order = {n: i for i, n in enumerate(graph.nodes)}
        inputs = [a for n in branch for a in _reads(n) if a not in branch]
        start = max(inputs, key=order.__getitem__, default=None)
        if start is None:
            continue
        at = start
        for n in sorted(branch, key=order.__getitem__):
            if order[n] > order[at]:  # (a branch node already before ``start`` stays where it is)
                at.append(n)
                at = n


def generate(gm: fx.GraphModule, plan: Plan, config: ApproxConfig) -> Rewritten:
    """The rewritten GraphModule of traced ``gm`` under ``plan``."""
    ring_plan = _ring_plan(gm, plan) if config.ring is not False and plan.units else None
    ring = Ring(ring_plan.nslots) if ring_plan is not None else None
    modules: dict[str, nn.Module] = dict(gm.named_modules())
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    codes: dict[fx.Node, fx.Node] = {}

    def call(module: nn.Module, label: str, kind: str, args, kwargs=None) -> fx.Node:
        name = f"tritonact_{kind}_{label.replace('.', '_')}"  # e.g. tritonact_unit_layer1_0_bn1
        while name in modules:
            name += "_"
        modules[name] = module
        return graph.call_module(name, args, kwargs)

    def split(node: fx.Node, result: fx.Node) -> None:
        env[node] = graph.call_function(operator.getitem, (result, 0))
        codes[node] = graph.call_function(operator.getitem, (result, 1))

    in_stems = {n for pair in plan.stems.values() for n in pair}
    for node in gm.graph.nodes:
        if node in plan.absorbed or node in in_stems:
            continue
        if node in plan.stems:
            conv_node, final = plan.stems[node]
            spec = plan.units[final][0]
            unit = Unit(spec, config)
            stem = Stem(modules[conv_node.target], unit, CodedPool(plan.pools[node], plan.backend))
            split(node, call(stem, spec.name, "stem", (env[conv_node.args[0]],)))
        elif node in plan.units:
            spec, y, res = plan.units[node]
            slot = ring_plan.slot_of.get(node) if ring_plan is not None else None
            # A join's residual goes by keyword: module-level tools that watch a call's positional tensor inputs
            # (MemTracker's ModTracker) would otherwise hold y's gradient until the residual's arrives, i.e. through
            # the whole block's backward, an activation-sized tensor that an untracked step never keeps.
            kwargs = None if res is None else {"residual": env[res], "res_code": codes.get(res)}
            if res is not None and _sole_conv_output(y, modules):
                kwargs["overwrite"] = True
            split(node, call(Unit(spec, config, ring, slot), spec.name, "unit", (env[y],), kwargs))
            if spec.post is not None:  # a norm-plus-activation module's activation; its output has no code
                f = _OUT_OF_PLACE.get(type(spec.post)) if getattr(spec.post, "inplace", False) else None
                post = graph.call_function(f, (env[node],)) if f else call(spec.post, spec.name, "act", (env[node],))
                kind = _derived_kind(None, f) if f else _derived_kind(spec.post)
                env[node] = graph.call_function(saved.derive, (post, env[node], kind)) if kind else post
                del codes[node]
        elif node in plan.convs:
            x = node.args[0]
            env[node] = call(CodedConv(plan.convs[node], plan.backend), node.target, "conv", (env[x], codes.get(x)))
        elif node in plan.pools:
            x = node.args[0]
            split(node, call(CodedPool(plan.pools[node], plan.backend), node.target, "pool", (env[x], codes.get(x))))
        elif (f := _out_of_place(node, plan, modules)) is not None:
            # an in-place activation on a unit's output saves a copy of its input (autograd clones what it
            # overwrites); out of place it saves the output itself, whose code the unit already stored
            x = env[node.args[0]]
            env[node] = graph.call_function(f, (x,))
            if (kind := _derived_kind(None, f)) is not None:
                env[node] = graph.call_function(saved.derive, (env[node], x, kind))
        elif _is_product(node):  # a gate multiply: its output, when saved, is the decoded operand times the gate
            prod = graph.node_copy(node, lambda n: env[n])
            env[node] = graph.call_function(saved.derive_product, (prod, *prod.args))
        elif (kind := _derivable(node, modules)) is not None:
            # its output, when saved (the next convolution's input), is decoded from its input's code
            env[node] = graph.call_function(
                saved.derive, (graph.node_copy(node, lambda n: env[n]), env[node.args[0]], kind)
            )
        else:
            if node.op == "get_attr":  # a parameter, buffer or constant the forward reads: the same object
                modules[node.target] = _fetch(gm, node.target)
            env[node] = graph.node_copy(node, lambda n: env[n])
    if config.ring is not True:  # (the ring's slots are scheduled on the traced order)
        _hoist_residual_branches(graph, modules)
    _fork_shared(graph, modules, [env[n] for n in (*plan.units, *plan.pools) if n in env])
    graph.lint()
    return Rewritten(fx.GraphModule(modules, graph, class_name=type(gm).__name__), plan, ring_plan, ring)
