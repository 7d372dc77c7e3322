"""Rewriting a traced model: find the units (:mod:`~tritonact.rewrite.plan`), emit a GraphModule that calls the
``tritonact::`` ops for them (:mod:`~tritonact.rewrite.codegen`, :mod:`~tritonact.rewrite.calls`)."""

from tritonact.rewrite.codegen import Rewritten, derives, generate
from tritonact.rewrite.plan import JOIN_MIN_GAMMA, Plan, UnitSpec, has_hooks, make_plan, trace

__all__ = ["JOIN_MIN_GAMMA", "Plan", "Rewritten", "UnitSpec", "derives", "generate", "has_hooks", "make_plan", "trace"]
