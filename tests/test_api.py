from pathlib import Path

import tritonact

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_public_name_imports():
    for name in tritonact.__all__:
        assert getattr(tritonact, name) is not None, name


def test_every_public_name_is_documented():
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    missing = [n for n in tritonact.__all__ if n not in text]
    assert not missing, f"not mentioned in docs/: {missing}"
