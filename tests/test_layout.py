"""The layout's rules, checked: inference code never imports training code, and no module is over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).parents[1]
MAX_LINES = 400


# Packages whose code runs at inference time (search, rewards, provers, RL advantages, sampling, jobs).
INFERENCE = ["models", "rewards", "provers", "search", "policy", "labeling", "jobs", "tasks"]
INFERENCE_FILES = ["advantages.py", "values.py", "steps.py", "interfaces.py", "registry.py"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_inference_code_never_imports_training_code():
    """No arrow from inference to training: not at the top of a file, not in a lazy import inside a function."""
    files = [p for pkg in INFERENCE for p in (REPO / "pavlit" / pkg).rglob("*.py")]
    files += [REPO / "pavlit" / name for name in INFERENCE_FILES if (REPO / "pavlit" / name).is_file()]
    assert len(files) > 40
    offenders = {
        str(p.relative_to(REPO)): sorted(n for n in _imports(p) if n.startswith(("pavlit.modules", "pavlit.data")))
        for p in files
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / "pavlit").rglob("*.py")}
    assert len(sizes) > 80
    assert not {path: n for path, n in sizes.items() if n > MAX_LINES}
