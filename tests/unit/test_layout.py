"""The shape DESIGN.md promises, checked on the source tree itself.

engine/ never imports Ray or the cluster package (executors reach merge() through the Executor
interface; only the command line knows both), and no source module grows past 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("engine", "cluster", "cli")
MAX_LINES = 600


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_engine_never_imports_cluster_or_ray():
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m
            for m in _imports(p)
            if m.split(".")[0] == "ray" or m.startswith("raymerge.cluster") or m.startswith("raymerge.cli")
        )
        for p in (ROOT / "engine").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_source_module_over_600_lines():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")
    }
    assert sizes and not {k: n for k, n in sizes.items() if n > MAX_LINES}
