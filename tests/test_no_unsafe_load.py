"""Safety: no ``torch.load`` without ``weights_only=True`` anywhere in the package, its tests or benchmarks."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _unsafe_loads(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                     for k in node.keywords)
            if not ok:
                bad.append(node.lineno)
    return bad


def test_every_torch_load_is_weights_only() -> None:
    files = [p for d in ("src", "tests") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    bad = {str(p.relative_to(ROOT)): lines for p in files if (lines := _unsafe_loads(p))}
    assert not bad, f"torch.load without weights_only=True (unpickles arbitrary code): {bad}"
