"""Standalone compiled graphs for the compiled CPU path (:mod:`tritonact.compiled`), called without dynamo.

A function is traced by ``make_fx`` (symbolic sizes, no duck sizing) and compiled by
``torch._inductor.standalone_compile``; the graph keeps what its trace and compilation assumed of the inputs and is
called directly. Without ``torch.compile``'s per-call machinery (frame hook, guard tree, runtime wrappers) a call
costs about half as much, and far less when caches are cold, as they are between a model's convolutions
(docs/kernels.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import platform
import sys
import uuid
import warnings
from pathlib import Path

import torch

__all__ = ["Graphs", "CompileNotice"]

# thread-local dispatch key sets (include, exclude) outside any op, as at import time
_PLAIN_DISPATCH_STATE = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


def _no_cuda_runtime_line(record: logging.LogRecord) -> bool:
    return "No CUDA runtime is found" not in record.getMessage()


def _no_artifact_line(record: logging.LogRecord) -> bool:
    return "artifact generation failed, cannot save" not in record.getMessage()


def _quiet_logs() -> None:
    """Two log lines that say nothing about this path are filtered (only they): inductor imports
    ``torch.utils.cpp_extension``, which warns "No CUDA runtime is found" on every CPU-only machine, and
    ``standalone_compile`` warns that it cannot save a serialized artifact, which is never asked for here (its
    graph caches are off, see ``_Graph.compile``)."""
    for name, line in (
        ("torch.utils.cpp_extension", _no_cuda_runtime_line),
        ("torch._inductor.standalone_compile", _no_artifact_line),
    ):
        logger = logging.getLogger(name)
        if line not in logger.filters:
            logger.addFilter(line)


class Graphs:
    """One key's compiled graphs. Each is traced with symbolic sizes (``make_fx``) and compiled by inductor
    (``torch._inductor.standalone_compile``), and holds what its trace and compilation assumed of the inputs: their
    dtypes, their sizes and strides as expressions of the trace's symbols, and conditions on those symbols (e.g.
    "the per-channel reduction has more than 4096 elements": inductor then sums in chunks). An input that differs
    gets a graph of its own. Calls go straight to the compiled code: without dynamo's frame evaluation, guard tree
    and runtime wrappers a call costs about half as much, and far less when the caches are cold, as they are between
    a model's convolutions (measured: docs/kernels.md). Which graph serves an input is found once per distinct input
    signature (dtypes, sizes, strides, storage offsets) and remembered."""

    def __init__(self, name: str, fn):
        _quiet_logs()
        self.fn = fn
        self.name = name
        self.graphs: list[_Graph] = []
        self.memo: dict = {}
        self.unguardable = False  # a trace made conditions this class cannot check: the key runs eagerly
        self.stored: list[_Graph] | None = None  # this key's graphs on disk (_Store), not loaded yet

    def __call__(self, *args):
        """The compiled result, or None where the eager reference must run (remembered: no retry per call)."""
        sig = tuple(None if a is None else (a.dtype, a.shape, a.stride(), a.storage_offset()) for a in args)
        graph = self.memo.get(sig)
        if graph is None:
            graph = self._graph_for(args)
            if len(self.memo) >= _MEMO_LIMIT:
                self.memo.clear()
            self.memo[sig] = graph
        return graph(*args) if graph is not False else None

    def _graph_for(self, args):
        if self.unguardable:
            return False
        for graph in self.graphs:
            if graph.accepts(args):
                return graph.compiled
        if len(self.graphs) >= _GRAPH_LIMIT:
            _warn_once(
                f"tritonact: {self.name}: {_GRAPH_LIMIT} graphs compiled already; the eager torch reference "
                "runs for inputs none of them accepts"
            )
            return False
        if self.stored is None:
            self.stored = _STORE.entries(self.name)
        for graph in self.stored:
            if graph.accepts(args) and _STORE.load(graph):
                self.stored.remove(graph)
                self.graphs.append(graph)
                return graph.compiled
        _notice_once()
        try:
            graph = _Graph.compile(self.fn, args, self.name)
        except _Unguardable as e:
            self.unguardable = True
            _warn_once(f"tritonact: {e}; the eager torch reference runs for this key")
            return False
        self.graphs.append(graph)
        _STORE.save(self.name, graph)
        return graph.compiled


def _unaliased(args) -> tuple:
    """``args`` with each tensor that shares storage with an earlier one replaced by a new tensor of the same sizes
    and strides (a symbolic trace reads no values).
    Traced as they are, two aliased arguments become one input of the graph, which then reads one buffer for both
    whatever it is given later: a test that passed one tensor as a unit's gamma and as its ``1/sigma`` left a
    backward graph on disk that read gamma for ``1/sigma`` in every later call of its key."""
    seen, out = set(), []
    for a in args:
        if isinstance(a, torch.Tensor) and a.numel():
            ptr = a.untyped_storage().data_ptr()
            if ptr in seen:
                a = torch.empty_strided(a.size(), a.stride(), dtype=a.dtype, device=a.device)
            seen.add(ptr)
        out.append(a)
    return tuple(out)


class _Graph:
    """A compiled graph and what it assumes of its inputs (see :class:`Graphs`)."""

    def __init__(self, compiled, specs, symbols, conditions, blob=None, single=False):
        self.compiled = compiled
        self.blob = blob  # the compiled code, serialized (kept on disk by _Store), or None
        self.single = single  # the function returns one tensor (a loaded graph returns a list of it)
        self.specs = specs  # per input: None, or (dtype, size expressions, stride expressions)
        self.symbols = symbols  # {symbol: (input, "size" | "stride" | "offset", dim)}
        self.conditions = conditions  # sympy booleans over the symbols

    @classmethod
    def compile(cls, fn, args, name: str) -> _Graph:
        # Called from inside a ``tritonact::`` op, where autograd's dispatch keys are excluded for the op's body:
        # tracing and compiling run with the dispatch state of ordinary code instead (inductor's decompositions
        # fail under the op's state).
        with torch._C._ForceDispatchKeyGuard(*_PLAIN_DISPATCH_STATE):
            return cls._compile(fn, args, name)

    @classmethod
    def _compile(cls, fn, args, name: str) -> _Graph:
        import torch._inductor
        import torch.fx.experimental._config as fx_config
        from torch.fx.experimental.proxy_tensor import make_fx

        if not hasattr(torch._inductor, "standalone_compile"):
            raise ImportError(f"torch {torch.__version__} has no torch._inductor.standalone_compile")
        # no duck sizing: two sizes equal in the example must not become one symbol
        with fx_config.patch(use_duck_shape=False):
            gm = make_fx(fn, tracing_mode="symbolic")(*_unaliased(args))
        fakes = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        # Compiled from the trace's own fake inputs, so that the conditions inductor adds are stated in the trace's
        # symbols. A hit in inductor's caches of whole graphs restores a graph without restating the conditions it
        # was compiled under: where one happens, the graph is compiled again with those caches off (the C++ of a
        # graph is still cached: a warm compile takes seconds), which states them, and that graph runs here. Only
        # the hit's code can be serialized, and it may assume more than those conditions (a forward graph's code
        # asserted rows of 4 values, was stored without that condition, and a later process ran it on rows of
        # 324), so the store keeps it for this input's exact sizes and strides only.
        exact = False
        with torch._inductor.config.patch(_inductor_options()):
            compiled, blob = _STORE.compile(gm, fakes, name) if _STORE.on() else (None, None)
            if compiled is None:
                exact = blob is not None
                with (
                    torch._inductor.config.patch(fx_graph_cache=False),
                    torch._functorch.config.patch(enable_autograd_cache=False),
                ):
                    compiled = torch._inductor.standalone_compile(gm, fakes, dynamic_shapes="from_graph")
        symbols, specs = {}, []
        for i, val in enumerate(fakes):
            if not isinstance(val, torch.Tensor):
                specs.append(None)
                continue
            specs.append((val.dtype, [_sym_expr(v) for v in val.shape], [_sym_expr(v) for v in val.stride()]))
            for what, seq in (("size", val.shape), ("stride", val.stride()), ("offset", (val.storage_offset(),))):
                for d, v in enumerate(seq):
                    # the symbol the trace made for this size, before the shape env unified it with equal ones
                    e = getattr(v.node, "_expr", v.node.expr) if isinstance(v, torch.SymInt) else None
                    if e is not None and e.is_Symbol:
                        symbols.setdefault(e, (i, what, d))
        conditions = [g.expr for g in gm.shape_env.guards]
        exprs = conditions + [e for s in specs if s is not None for e in (*s[1], *s[2])]
        unknown = set().union(*(e.free_symbols for e in exprs)) - set(symbols) if exprs else set()
        if unknown:
            raise _Unguardable(f"{name}: conditions on {sorted(map(str, unknown))}, not input sizes")
        single = isinstance(next(n for n in gm.graph.nodes if n.op == "output").args[0], torch.fx.Node)
        graph = cls(compiled, specs, symbols, conditions, None if exact else blob, single)
        if not graph.accepts(args):
            raise _Unguardable(f"{name}: its own example input violates its conditions")
        if exact:  # what the store keeps of a cache hit's code (above)
            graph.exact = cls(None, _exact_specs(args), {}, [], blob, single)
        return graph

    def accepts(self, args) -> bool:
        """Whether ``args`` have the dtypes, sizes and strides the graph expects and satisfy its conditions."""
        import sympy

        if len(args) != len(self.specs):
            return False
        values = {}
        for sym, (i, what, d) in self.symbols.items():
            a = args[i]
            v = a.shape[d] if what == "size" else a.stride(d) if what == "stride" else a.storage_offset()
            values[sym] = sympy.Integer(v)
        for spec, a in zip(self.specs, args):
            if spec is None or a is None:
                if (spec is None) != (a is None):
                    return False
                continue
            dtype, sizes, strides = spec
            if a.dtype != dtype or a.dim() != len(sizes):
                return False
            for e, v in zip((*sizes, *strides), (*a.shape, *a.stride())):
                if e.xreplace(values) != v:
                    return False
        return all(c.xreplace(values) in (sympy.true, True) for c in self.conditions)


def _inductor_options() -> dict:
    """Inductor options for tritonact's graphs. Its C++ backend's tiling heuristics leave a loop scalar where it counts
    many loads whose index is not contiguous along the vector (here: the packed words, one per 8 or 16 codes, and
    the per-channel grid rows): a 4-bit decode with a centroid table then ran 7x slower than with midpoints (8.1 vs
    1.1 ms for a (8, 256, 16, 16) code, one thread, AVX-512), 2.3 ms vectorized."""
    cpp = getattr(torch._inductor.config, "cpp", None)
    return {"cpp.enable_tiling_heuristics": False} if hasattr(cpp, "enable_tiling_heuristics") else {}


def _exact_specs(args) -> list:
    """Specs that accept only ``args``' own dtypes, sizes and strides."""
    import sympy

    return [
        None if a is None else (a.dtype, [sympy.Integer(v) for v in a.shape], [sympy.Integer(v) for v in a.stride()])
        for a in args
    ]


def _sym_expr(v):
    """A size or stride of a trace's fake tensor as a sympy expression (an int as a sympy integer)."""
    import sympy

    return v.node.expr if isinstance(v, torch.SymInt) else sympy.Integer(v)


class _Unguardable(RuntimeError):
    pass


class _Store:
    """Compiled graphs kept on disk, so that a new process loads them instead of tracing and compiling again (the
    wait before a process's first steps: docs/benchmarks.md). Each file holds one graph: its key's name, what it
    assumes of its inputs (:class:`_Graph`) and inductor's serialized code. The folder is under inductor's cache
    folder (``TORCHINDUCTOR_CACHE_DIR``), in a subfolder named by a hash of tritonact's source files, the torch and
    Python versions and the CPU's vector instruction set, so that a graph is only ever loaded by the code that
    made it. ``TRITONACT_GRAPH_CACHE=0`` turns it off; it is off where this torch cannot serialize a graph."""

    def __init__(self):
        self.failed = False

    def on(self) -> bool:
        return not self.failed and self.folder() is not None

    @staticmethod
    @functools.cache
    def folder() -> Path | None:
        if os.environ.get("TRITONACT_GRAPH_CACHE", "1") == "0":
            return None
        try:
            import inspect

            from torch._inductor.cpu_vec_isa import pick_vec_isa
            from torch._inductor.runtime.cache_dir_utils import cache_dir
            from torch._inductor.standalone_compile import AOTCompiledArtifact  # noqa: F401

            if "aot" not in inspect.signature(torch._inductor.standalone_compile).parameters:
                return None
            h = hashlib.sha256()
            for part in (torch.__version__, sys.version, platform.machine(), str(pick_vec_isa())):
                h.update(part.encode() + b"\0")
            for f in sorted(Path(__file__).parent.rglob("*.py")):
                h.update(f.read_bytes())
            return Path(cache_dir()) / "tritonact" / h.hexdigest()[:24]
        except Exception:  # a private API moved: no store
            return None

    def compile(self, gm, fakes, name: str):
        """``(compiled, blob)``: the compiled graph and its serialized code; ``compiled`` is None where the graph must
        be compiled again with inductor's caches off (a cache hit: see ``_Graph._compile``; ``blob`` is then the
        hit's code), ``blob`` None where this torch cannot serialize one."""
        from torch._dynamo.utils import counters

        def hits():
            return counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]

        before = hits()
        try:
            with self._tagged(name):
                compiled = torch._inductor.standalone_compile(gm, fakes, dynamic_shapes="from_graph", aot=True)
            blob = compiled.serialize()
        except Exception:
            self.failed = True  # this torch cannot: compile as before, keep nothing
            return None, None
        return (compiled if hits() == before else None), blob

    def _tagged(self, name: str):
        """Inductor's caches of whole graphs keyed by this store's folder and the graph's key too
        (``cache_key_tag``). A hit's code is kept for its own input only (``_Graph._compile``), so a hit made every
        later process compile that key again (some 10 s before a resnet50's first step). They came from another
        tritonact's sources, whose graphs are the same, and from another key whose graph is the same (the centroid
        statistics of ReLU and of no activation). Where this torch has no tag, hits are handled as before."""
        cfg = torch.compiler.config
        if not hasattr(cfg, "cache_key_tag"):
            return contextlib.nullcontext()
        return cfg.patch(cache_key_tag=f"{cfg.cache_key_tag}|tritonact-{self.folder().name}-{_stem(name)}")

    def entries(self, name: str) -> list[_Graph]:
        """This key's stored graphs (their code not yet loaded)."""
        folder = self.folder() if not self.failed else None
        out = []
        if folder is None or not folder.is_dir():
            return out
        for f in sorted(folder.glob(_stem(name) + "-*.pkl")):
            try:
                entry = pickle.loads(f.read_bytes())
                if entry["name"] == name:
                    kept = (entry[k] for k in ("specs", "symbols", "conditions", "blob", "single"))
                    out.append(_Graph(None, *kept))
            except Exception:  # unreadable (another process writing it, a crash): ignored
                continue
        return out

    def load(self, graph: _Graph) -> bool:
        from torch._inductor.standalone_compile import AOTCompiledArtifact

        try:
            fn = AOTCompiledArtifact.deserialize(graph.blob)
        except Exception:
            return False
        graph.compiled = (lambda *args: fn(*args)[0]) if graph.single else fn
        graph.blob = None  # loaded: the bytes are not needed again
        return True

    def save(self, name: str, graph: _Graph) -> None:
        graph = getattr(graph, "exact", None) or graph  # a cache hit's code: kept for its own input only
        folder, blob, graph.blob = self.folder(), graph.blob, None  # (the bytes are not kept in memory)
        if blob is None or folder is None or self.failed:
            return
        entry = dict(
            name=name, specs=graph.specs, symbols=graph.symbols, conditions=graph.conditions, blob=blob,
            single=graph.single,
        )  # fmt: skip
        try:
            data = pickle.dumps(entry)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{_stem(name)}-{uuid.uuid4().hex[:12]}.pkl"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: a reader sees all of it or nothing
        except Exception:  # a full disk, a read-only cache folder: the graph is simply not kept
            return


def _stem(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:20]


_STORE = _Store()


_GRAPH_LIMIT = 8  # graphs per key; past it the eager reference runs for inputs no graph accepts
_MEMO_LIMIT = 4096  # remembered input signatures per key


_warned: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=6)  # the caller of the entry point (forward_xh...)


class CompileNotice(UserWarning):
    """Told once per process: the compiled CPU path is compiling (a silent wait otherwise)."""


_noticed = False


def _notice_once() -> None:
    global _noticed
    if not _noticed:
        _noticed = True
        warnings.warn(
            "tritonact: compiling the CPU path with TorchInductor (the first steps on a machine: one to two minutes "
            "on 2 cores, as long again for each other dtype, e.g. under autocast; kept on disk, so later processes "
            "load them in seconds); TRITONACT_COMPILE=0 or ApproxConfig(compile=False) runs the eager path instead",
            CompileNotice,
            stacklevel=7,
        )
