"""Every Python code block of README.md and docs/*.md runs, at a tiny size, against the code as it is."""

import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    for path in FILES:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            line = text[: m.start()].count("\n") + 1
            yield pytest.param(m.group(1), id=f"{path.relative_to(ROOT)}:{line}")


def _names():
    """What the snippets take as given: a model, a loader, a loss, an optimizer, a batch (tiny: 32x32)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g)
    return {
        "model": model,
        "x": x,
        "y": y,
        "loader": [(x, y), (x, y)],
        "criterion": F.cross_entropy,
        "opt": torch.optim.SGD(model.parameters(), lr=0.01),
    }


def test_the_docs_have_code_blocks():
    assert len(list(_blocks())) >= 6


@pytest.mark.parametrize("code", list(_blocks()))  # (a generator is deprecated by pytest)
def test_code_block_runs(code, capsys):
    namespace = _names()
    exec(compile(code, "<doc block>", "exec"), namespace)
    if "print(" in code:
        assert capsys.readouterr().out.strip()  # it printed something
