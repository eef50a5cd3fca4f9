"""Docs that stay true: every code name and file path the README and docs/ mention exists.

Checked, from the `backticked` spans and the links of README.md and docs/*.md:
- a dotted name whose first part is a first-party package (``lensflow_core.s3_get.ObjectGetter``)
  imports, attribute by attribute;
- ``Class.member`` and ``module.name`` (``LiteModel.tensor``, ``cpus.usable_cpus``), when the
  first part is a class or module of the project: some such class or module defines it;
- a path whose first folder is one of the checkout's (``functions/predict/lensflow_predict/main.py``,
  ``eventing/``) exists, and ``path: name`` names something defined in that file;
- a relative link leads to a file.
Names are resolved as the code spells them today, so a rename that forgets the docs fails here.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_DIRS = {".venv", ".git", "var", "build", "__pycache__", "node_modules"}
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?")
PATH = re.compile(r"[\w.-]+(?:/[\w.-]+)*/?")
# a dotted name ending so is a file or object name (``predict.png``, ``labels.txt``), not code
FILE_SUFFIXES = (
    *(".py", ".md", ".yaml", ".yml", ".toml", ".js", ".html", ".json", ".txt", ".env"),
    *(".npz", ".h5", ".pth", ".tflite", ".png", ".jpg", ".jpeg", ".parquet", ".csv", ".log"),
)


def source_files() -> list[Path]:
    return [
        p
        for p in ROOT.rglob("*.py")
        if not SKIP_DIRS & set(p.relative_to(ROOT).parts)
        and not p.relative_to(ROOT).parts[0].startswith(".")
    ]


@cache
def definitions() -> tuple[dict[str, list[set[str]]], dict[str, list[set[str]]]]:
    """Classes (name -> members of each) and modules (stem -> top-level names of each)."""
    classes: dict[str, list[set[str]]] = {}
    modules: dict[str, list[set[str]]] = {}
    for path in source_files():
        tree = ast.parse(path.read_text())
        modules.setdefault(path.stem, []).append(top_level_names(tree))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(top_level_names(node))
    return classes, modules


def top_level_names(node: ast.Module | ast.ClassDef) -> set[str]:
    names = set()
    for child in node.body:
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(child.name)
        elif isinstance(child, (ast.Assign, ast.AnnAssign)):
            targets = child.targets if isinstance(child, ast.Assign) else [child.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in child.names}
    return names


@cache
def first_party(name: str) -> bool:
    """Whether ``name`` imports from this checkout (not from site-packages)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    origin = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))
    if not origin or not Path(origin).is_absolute():
        return False  # built-in, frozen
    path = Path(origin).resolve()
    return path.is_relative_to(ROOT) and not SKIP_DIRS & set(path.relative_to(ROOT).parts)


def resolve_dotted(name: str) -> str | None:
    """None if ``name`` (``package.module.attr...``) exists, else what is wrong. Read from
    the source, never imported (importing can depend on what the process loaded before)."""
    top, *rest = name.split(".")
    path = Path(importlib.util.find_spec(top).origin)
    done = [top]
    while rest and path.name == "__init__.py":
        if (path.parent / rest[0] / "__init__.py").exists():
            path = path.parent / rest[0] / "__init__.py"
        elif (path.parent / f"{rest[0]}.py").exists():
            path = path.parent / f"{rest[0]}.py"
        else:
            break
        done.append(rest.pop(0))
    if not rest:
        return None
    tree = ast.parse(path.read_text())
    if rest[0] not in top_level_names(tree):
        return f"{'.'.join(done)} has no {rest[0]!r}"
    owner = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == rest[0]), None)
    if len(rest) > 1 and owner is not None and rest[1] not in top_level_names(owner):
        return f"{'.'.join(done + rest[:1])} has no {rest[1]!r}"
    return None


def check_span(span: str) -> str | None:
    """What is wrong with one backticked span; None when right or not a code name."""
    text = span.strip()
    head, _, tail = text.partition(": ")
    if PATH.fullmatch(head) and "/" in head:
        return check_path(head, tail.strip() if tail else "")
    if not DOTTED.fullmatch(text):
        return None
    name = text.removesuffix("()")
    if name in NOT_CODE:
        return None
    first, *rest = name.split(".")
    if first_party(first):
        return resolve_dotted(name)
    if rest and Path(name).suffix in FILE_SUFFIXES:
        return None  # an object or file name such as labels.txt
    classes, modules = definitions()
    if first in classes and len(rest) == 1:
        found = any(rest[0] in members for members in classes[first])
        return None if found else f"no class {first} defines {rest[0]!r}"
    if first in modules and len(rest) == 1 and first not in NOT_MODULES:
        found = any(rest[0] in names for names in modules[first])
        return None if found else f"no module {first}.py defines {rest[0]!r}"
    return None


# First parts that are also module names but, in the docs, name something else
# (``s3.object.key`` is a field of a MinIO record, ``limits.cpu`` a pod's, not code).
NOT_MODULES = {"s3", "metrics", "spec", "config", "limits", "delivery"}
# Dotted names that are not code: what else they are.
NOT_CODE = {"lensflow.predict": "the predict span's name (OpenTelemetry)"}


def check_path(path: str, name: str = "") -> str | None:
    top = path.split("/")[0]
    if not top or not (ROOT / top).is_dir() or top in SKIP_DIRS or "*" in path:
        return None  # not a path in this checkout (an S3 key, a URL path, a glob)
    target = ROOT / path
    if not target.exists():
        return f"{path} does not exist"
    if name and target.suffix == ".py":
        found = re.match(r"[A-Za-z_]\w*", name)
        if found and found.group(0) not in top_level_names(ast.parse(target.read_text())):
            return f"{path} defines no {found.group(0)!r}"
    return None


def doc_problems(doc: Path) -> list[str]:
    text = doc.read_text()
    problems = []
    for match in SPAN.finditer(text):
        problem = check_span(match.group(1))
        if problem:
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{doc.relative_to(ROOT)}:{line}: `{match.group(1)}`: {problem}")
    for match in LINK.finditer(text):
        link = match.group(1)
        if "://" in link or link.startswith("mailto:"):
            continue
        if not (doc.parent / link).exists():
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{doc.relative_to(ROOT)}:{line}: link {link} leads nowhere")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_name_and_path_in_the_docs_exists(doc):
    problems = doc_problems(doc)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_wrong_name_and_a_wrong_path():
    assert check_span("lensflow_core.settings.Config") is None
    assert "no 'NoSuchThing'" in check_span("lensflow_core.settings.NoSuchThing")
    assert check_span("lensflow.process.ChildProcess.start") is None
    assert "does not exist" in check_span("lensflow/no_such_module.py")
    assert check_span("lensflow/process.py: ChildProcess") is None
    assert "defines no 'Nope'" in check_span("lensflow/process.py: Nope")
    assert "no class ChildProcess defines" in check_span("ChildProcess.no_such_method")
    assert check_span("io.lensflow.image.predicted") is None  # an event type, not code
