"""Functions that fit a screen: none in the product is longer than ``MAX_LINES`` (its
docstring not counted) unless its docstring says why ("Long because ...").

``TO_SPLIT`` lists the ones still waiting to be split; the test fails when a new long
function appears, and when one on the list got short (take it off, so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ["core", "model-store", "eventing", "functions", "lensflow"]
MAX_LINES = 60
# (file, function): long today, to be split
TO_SPLIT: set[tuple[str, str]] = set()


def length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the end, less the docstring's."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if ast.get_docstring(node) is not None:
        lines -= first.end_lineno - first.lineno + 1
    return lines


def long_functions(folders: list[str] = PRODUCT) -> dict[tuple[str, str], int]:
    """Every function over ``MAX_LINES`` whose docstring does not say why: its length."""
    found = {}
    for folder in folders:
        assert (ROOT / folder).is_dir(), f"no folder {folder}: a rename left PRODUCT behind"
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                why = "long because" in (ast.get_docstring(node) or "").lower()
                if length(node) > MAX_LINES and not why:
                    found[(str(path.relative_to(ROOT)), node.name)] = length(node)
    return found


def test_no_new_function_longer_than_a_screen():
    new = {k: n for k, n in long_functions().items() if k not in TO_SPLIT}
    assert not new, f"split these (or say why in the docstring): {new}"


def test_the_list_of_functions_to_split_only_shrinks():
    short = TO_SPLIT - set(long_functions())
    assert not short, f"no longer long: take {sorted(short)} off TO_SPLIT"


def test_the_count_leaves_out_the_docstring_and_sees_a_long_body(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    tree = ast.parse(f'def f():\n    """Doc.\n\n    More.\n    """\n{body}\n')
    assert length(tree.body[0]) == MAX_LINES + 1  # the def line and the body
