import os

# Triton kernels run on CPU tensors only under the interpreter, which must be chosen before any
# @triton.jit function is created, i.e. before tritonact.kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The compiled CPU path costs seconds of compilation per kind of unit; the suite runs the eager reference except
# in tests/test_compiled.py, which turns it on (ApproxConfig(compile=True)) and checks it against the eager path.
os.environ.setdefault("TRITONACT_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def poison_empty(monkeypatch):
    """Fill freshly allocated float/uint8 tensors with garbage so that an element a kernel forgot to write shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(0xA5)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    yield
