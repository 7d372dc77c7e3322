"""What a converted model's graph depends on (:func:`structure`), and the lock that keeps torch.fx tracing, which
patches ``torch.nn.Module`` for every thread while it runs, apart from the converted forwards of other threads."""

from __future__ import annotations

import operator
import threading
import weakref
from contextlib import contextmanager

from torch import nn

__all__ = ["TRACING", "structure"]


class _TraceLock:
    """Exclusive for tracing, shared for running converted forwards. A thread may trace while it holds the shared
    side itself (a conversion redone inside a forward): it waits only for the other threads."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}  # thread id -> depth
        self._writer: int | None = None
        self._depth = 0

    @contextmanager
    def shared(self):
        me = threading.get_ident()
        with self._cond:
            while self._writer is not None and self._writer != me:
                self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        me = threading.get_ident()
        with self._cond:
            while (self._writer is not None and self._writer != me) or any(t != me for t in self._readers):
                self._cond.wait()
            self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                self._cond.notify_all()


TRACING = _TraceLock()


_PRIMITIVE = (bool, int, float, str, type(None), tuple)
_ATTR_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (len(__dict__), getter)


def _attributes(m: nn.Module) -> tuple:
    """``m``'s plain Python attributes (numbers, strings, tuples: what a traced forward may have baked in)."""
    d = m.__dict__
    n = len(d) - ("forward" in d)  # an instance forward (the converted one, too) is compared on its own
    got = _ATTR_KEYS.get(m)
    if got is not None and got[0] == n:
        try:
            return (n, got[1](d))
        except KeyError:  # same number of attributes, other names
            pass
    names = [k for k, v in d.items() if type(v) in _PRIMITIVE and k != "training"]
    getter = operator.itemgetter(*names, "training")  # always a tuple ("training" is always there)
    _ATTR_KEYS[m] = (n, getter)
    return (n, getter(d))


def structure(model: nn.Module, all_training: bool = False) -> list:
    """What a traced graph of ``model`` depends on: its modules (names, identities, modes), their hooks, parameters,
    buffers, instance-level forwards and plain Python attributes. A conversion is valid while this is unchanged."""
    out = []
    for name, m in model.named_modules(remove_duplicate=False):
        d = m.__dict__
        fwd = d.get("forward")
        attrs = _attributes(m)
        if all_training:
            attrs = (attrs[0], attrs[1][:-1] + (True,))
        out.append(
            (
                name,
                id(m),
                attrs,
                tuple(m._forward_pre_hooks),
                tuple(m._forward_hooks),
                tuple(m._backward_pre_hooks),
                tuple(m._backward_hooks),
                _forward_id(fwd),
                tuple(map(id, m._parameters.values())),
                tuple(map(id, m._buffers.values())),
            )
        )
    return out


def _forward_id(fwd):
    """An instance-level forward's identity; a converted forward stands for the user's forward it wraps, if any."""
    if getattr(fwd, "_tritonact_forward", False):
        fwd = fwd.prev
    return None if fwd is None else id(fwd)
