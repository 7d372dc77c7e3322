"""``ApproxReport``: what ``tritonact.approximate`` did to a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from tritonact.ring import reader_is_safe

__all__ = ["ApproxReport", "kept_in_full"]


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
    ring_on: bool = False  # the ring is used at run time (ring=True)
    generic: object = field(default=None, repr=False)  # the context's saved.GenericPath (None: off)

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

    @property
    def coded_full_bytes(self) -> int:
        """Full-precision bytes of what the last training forward coded (units that coded, and the generic path)."""
        units = sum(u.last_full_bytes for u in self.units if u.last_code_bytes < u.last_full_bytes)
        return units + (self.generic.last_full_bytes if self.generic is not None else 0)

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
            join = (" (2 codes)" if u.store_xh or u.last_two_codes else "") + (f" ({u.bits} bits)" if u.bits else "")
            lines.append(f"{u.name:<40} {' + '.join(u.covers) + join:<48} {u.last_code_bytes / 2**20:>9.3f}")
        planned = any(r.ring_plan is not None for _, r in self.rewritten)
        if planned and not self.ring_on:
            lines.append(f"ring: off by default ({self.ring_slots} slots planned; ApproxConfig(ring=True))")
        elif planned:
            lines.append(f"ring: {self.ring_slots} slots, {self.ring_bytes / 2**20:.2f} MiB held")
            for what, why in self.ring_kept_out:
                lines.append(f"  kept out of the ring: {what}: {why}")
        else:
            lines.append("ring: off")
        g = self.generic
        if g is None:
            lines.append("generic path: off")
        elif g.skipped:
            lines.append(f"generic path: not used in the last training forward ({g.skipped})")
        else:
            if g.last_tensors:
                lines.append(
                    f"generic path: {g.last_tensors} other saved tensors ({g.last_fine} coded at 8 bits, "
                    f"{g.last_reused - g.last_derived} a unit's code serves, {g.last_derived} an activation's input's "
                    f"code serves), {g.last_code_bytes / 2**20:.2f} MiB of codes for "
                    f"{g.last_full_bytes / 2**20:.2f} MiB ("
                    + (
                        f"{g.last_full_bytes / g.last_code_bytes:.1f}x less)"
                        if g.last_code_bytes
                        else "nothing of its own)"
                    )
                )
            total = self.coded_full_bytes + g.last_kept_bytes
            if total:
                lines.append(
                    f"activations behind the codes: {self.coded_full_bytes / 2**20:.2f} MiB in full precision; kept "
                    f"as they are: {g.last_kept_bytes / 2**20:.2f} MiB ({100 * g.last_kept_bytes / total:.1f}% of the "
                    "two: the forward's inputs, small tensors, what no code covers)"
                )
        if self.exact:
            lines.append("left exact:")
            lines += [f"  {what}: {why}" for what, why in self.exact]
        return "\n".join(lines)


def kept_in_full(gm, plan) -> list:
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
