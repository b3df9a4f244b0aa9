"""Modules stay small enough to read in one sitting.

No module under stimnet/ (the generated stimnet/v1 aside), stimnetd/, stimctl/ or sandbox/
has more than 500 lines, and no function or method more than 60 (from its `def` line to
its last line, inclusive). A module whose docstring holds a sentence starting "Long
because" (saying why it is one unit) is exempt from both limits.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("stimnet", "stimnetd", "stimctl", "sandbox")
GENERATED = ROOT / "stimnet" / "v1"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                  if GENERATED not in p.parents)


def _exempt(tree: ast.Module) -> bool:
    doc = ast.get_docstring(tree) or ""
    return "Long because" in doc


def _oversized(path: Path) -> list[str]:
    source = path.read_text()
    tree = ast.parse(source)
    if _exempt(tree):
        return []
    name = path.relative_to(ROOT).as_posix()
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{name}: {lines} lines")
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_modules_and_functions_stay_within_their_limits() -> None:
    """No module exceeds 500 lines and no function 60, unless its module says why it is long."""
    problems = [problem for path in _modules() for problem in _oversized(path)]
    assert problems == [], "\n".join(problems)


def test_the_check_reads_every_package() -> None:
    """The size check sees the wire package, the daemon, the client and the sandbox runtime,
    and skips only the generated code."""
    seen = {p.relative_to(ROOT).parts[0] for p in _modules()}
    assert seen == set(PACKAGES)
    assert [p for p in _modules() if "v1" in p.relative_to(ROOT).parts[:2]] == []
