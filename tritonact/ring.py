"""The ring: a few shared full-precision buffers that the fused units' outputs live in, one after another.

The scheduler (:func:`schedule`) walks a :class:`tritonact.rewrite.Program`'s steps, finds for each unit output
the step of its last use, and gives it a slot that no live activation holds (greedy interval colouring, optimal
for intervals: the number of slots is the largest number of unit outputs alive at once). An output goes to the
ring only if nothing can read it after its slot is reused: every reader must be one of our ops (which keep codes,
never the tensor) or an op that keeps nothing of its input. Everything else (a graph output, a module call that
may save it or hand it to a user hook, a view) gets an ordinary allocation, and the report says why.

Reuse is guarded by autograd's version counter: a slot is written in place, so a tensor saved from it by
anything would fail loudly in backward rather than be read stale.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from tritonact.quant import _inverse, memory_order

__all__ = ["Ring", "RingPlan", "schedule"]

# Readers that keep nothing of their input for backward.
_SAFE_FUNCS = {F.adaptive_avg_pool2d, F.avg_pool2d, torch.cat, operator.add, torch.add, torch.mean}
_SAFE_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


def _users(buf: torch.Tensor) -> int:
    """How many tensors share ``buf``'s storage (views, autograd's saved copies, aliases)."""
    count = getattr(torch._C, "_storage_Use_Count", None)  # private; present in torch 2.1-2.14
    if count is None:  # pragma: no cover - a torch without it: the check is skipped
        return 0
    return count(buf.untyped_storage()._cdata)


class Ring:
    """Per (device, dtype) slot buffers, grown on demand; slot ``-1`` is the backward pass's scratch buffer."""

    def __init__(self, nslots: int):
        self.nslots = nslots
        self._bufs: dict = {}
        self._alone: dict = {}  # key -> _users(buffer) with no tensor handed out from it alive

    def take(self, slot: int, shape, perm, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A dense tensor of ``shape`` laid out in memory order ``perm``, backed by ``slot``'s buffer."""
        numel = 1
        for s in shape:
            numel *= s
        key = (device, dtype, slot)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            # grow: a tensor still living in the old buffer keeps it alive until it dies
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._bufs[key] = buf
            self._alone[key] = _users(buf)
        elif _users(buf) > self._alone[key]:  # the schedule's rules broken: never overwrite silently
            raise RuntimeError(
                f"tritonact: ring slot {slot} is handed out again while a tensor in it is still referenced "
                "(its contents would change under it); run with ApproxConfig(ring=False) and report the model"
            )
        return buf[:numel].view([shape[d] for d in perm]).permute(_inverse(perm))

    def like(self, slot: int, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.take(slot, tuple(t.shape), memory_order(t), dtype or t.dtype, t.device)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def release(self) -> None:
        self._bufs.clear()
        self._alone.clear()


@dataclass
class RingPlan:
    slot_of: dict = field(default_factory=dict)  # unit node -> slot
    kept_out: list = field(default_factory=list)  # (unit name, why)
    nslots: int = 0


def reader_is_safe(user: fx.Node, node: fx.Node, plan, modules) -> str | None:
    """None if ``user`` keeps nothing of ``node``'s value past its own step, else why it may."""
    if user.op == "output":
        return "it is a graph output"
    if user in plan.convs or user in plan.pools:
        return None
    if user in plan.units or user in plan.absorbed:  # another unit: keeps a code of it, never the tensor
        return None
    if user.op == "call_function" and user.target in _SAFE_FUNCS and not user.kwargs.get("out"):
        return None
    if user.op == "call_method" and user.target in ("mean",):
        return None
    if user.op == "call_module" and isinstance(modules[user.target], _SAFE_MODULES):
        m = modules[user.target]
        if not (m._forward_hooks or m._forward_pre_hooks):
            return None
    if user.op == "call_module":
        return f"read by {user.target} ({type(modules[user.target]).__name__}), which may keep it"
    what = user.target if user.op != "call_function" else getattr(user.target, "__name__", str(user.target))
    return f"read by {what} ({user.op}), which may keep it"


def schedule(steps, last_use: dict, plan, modules) -> RingPlan:
    """Assign ring slots to unit outputs (``steps`` and ``last_use`` from a Program)."""
    rp = RingPlan()
    busy_until: list[int] = []  # per slot: last step that reads its current occupant
    for i, (kind, node, extra) in enumerate(steps):
        if kind != "unit":
            continue
        spec = extra[0]
        why = next((w for u in node.users if (w := reader_is_safe(u, node, plan, modules))), None)
        if why is None and node not in last_use:
            why = "it is never read"
        if why is not None:
            rp.kept_out.append((spec.name, why))
            continue
        slot = next((s for s, end in enumerate(busy_until) if end < i), None)
        if slot is None:
            slot = len(busy_until)
            busy_until.append(0)
        busy_until[slot] = last_use[node]
        rp.slot_of[node] = slot
    rp.nslots = len(busy_until)
    return rp
