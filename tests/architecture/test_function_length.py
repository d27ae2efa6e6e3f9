"""Short functions in the training wing, and a short top-level training script: the loop reads as named steps."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 80
MAX_SCRIPT_LINES = 60


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function or method longer than ``limit`` lines, decorators and
    docstring included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
            length = node.end_lineno - first + 1
            if length > limit:
                found.append((node.name, first, length))
    return found


def test_the_length_rule_counts_whole_functions() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(79))
    assert long_functions(f"def fits():\n{body}") == []  # 80 lines with its def
    assert long_functions(f"@staticmethod\ndef too_long():\n{body}") == [("too_long", 1, 81)]
    method_body = body.replace("    ", "        ")  # one level deeper, inside a class
    assert long_functions(f"class A:\n    def method(self):\n{method_body}        y = 1\n") == [
        ("method", 2, 81)
    ]


def test_no_function_in_the_training_wing_is_longer_than_80_lines() -> None:
    wing = REPO_ROOT / "cadmtl" / "training"
    too_long = [
        f"{path.relative_to(REPO_ROOT)}:{line} {name} is {length} lines"
        for path in sorted(wing.rglob("*.py"))
        for name, line, length in long_functions(path.read_text())
    ]
    assert not too_long, f"split these into named steps (<= {MAX_FUNCTION_LINES} lines):\n" + "\n".join(
        too_long
    )


def test_train_accelerate_py_is_a_short_entry_point_into_the_package() -> None:
    script = (REPO_ROOT / "train_accelerate.py").read_text()
    assert len(script.splitlines()) <= MAX_SCRIPT_LINES
    assert "from cadmtl.training.loop import main" in script
