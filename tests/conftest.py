"""Shared fixtures: real servers on free loopback ports, stopped at the end; and the
``slow`` mark put on every test that needs them (``make test-fast`` leaves those out)."""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path

import pytest

from lensflow.servers import KafkaBroker, S3Server
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config
from tests.support.env import make_env


@pytest.fixture(scope="session")
def s3_server():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def kafka_broker():
    with KafkaBroker() as broker:
        yield broker


@pytest.fixture
def env(s3_server) -> dict[str, str]:
    """Environment for one test: its own buckets on the shared S3 server; no broker."""
    values = make_env(s3_server.endpoint)
    config = Config.from_env(values)
    ensure_buckets(s3_client(config), config.buckets)
    return values


@pytest.fixture
def kafka_env(s3_server, kafka_broker) -> dict[str, str]:
    """Environment for one test: its own buckets and topic names on both servers."""
    values = make_env(s3_server.endpoint, kafka_broker.bootstrap)
    config = Config.from_env(values)
    ensure_buckets(s3_client(config), config.buckets)
    return values


@pytest.fixture
def config(env) -> Config:
    return Config.from_env(env)


@pytest.fixture
def kafka_config(kafka_env) -> Config:
    return Config.from_env(kafka_env)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, bytes]:
    """Three real 3-class models: random, always-class-0 and always-class-2."""
    from tests.support.tflite_models import tiny_classifier

    return {
        "random": tiny_classifier(seed=1),
        "first": tiny_classifier(seed=2, bias=0),
        "last": tiny_classifier(seed=3, bias=2),
    }


# What makes a test an integration test: a fixture that starts a server, builds models
# with TensorFlow or drives Chromium; a name in its body that starts a process; or an import
# (in its module or its body) that loads TensorFlow.
HEAVY_FIXTURES = {"s3_server", "kafka_broker", "tiny_models", "browser"}
HEAVY_NAMES = {
    "S3Server",
    "KafkaBroker",
    "FunctionServer",
    "EmbeddedStack",
    "ReplicaPool",
    "ChildProcess",
    "Browser",
    "start_stack",
    "subprocess",
    "lensflow",  # tests.support.cli.lensflow: the CLI in a child process
}
ROOT = Path(__file__).resolve().parents[1]


def module_file(module: str) -> Path | None:
    """The first-party file ``module`` names (or the module holding ``module`` when its
    last part is an attribute); None for anything not in this checkout. Imports nothing."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: nothing is executed
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not Path(spec.origin).is_absolute():
        return None
    path = Path(spec.origin).resolve()
    if not path.is_relative_to(ROOT) or ".venv" in path.relative_to(ROOT).parts:
        return None
    for part in rest:
        if path.name != "__init__.py":
            break  # an attribute of a module
        if (path.parent / part / "__init__.py").exists():
            path = path.parent / part / "__init__.py"
        elif (path.parent / f"{part}.py").exists():
            path = path.parent / f"{part}.py"
        else:
            break
    return path


@cache
def loads_tensorflow(module: str) -> bool:
    """Whether importing ``module`` imports TensorFlow (first-party imports followed)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name.split(".")[0] in ("tensorflow", "keras"):
            return True
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += imports(ast.parse(path.read_text()), top_level_only=True)
    return False


def imports(tree: ast.AST, top_level_only: bool = False) -> set[str]:
    """Modules ``tree`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    nodes = tree.body if top_level_only and isinstance(tree, ast.Module) else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@cache
def module_tree(path: str) -> ast.Module:
    return ast.parse(Path(path).read_text())


def is_heavy(item: pytest.Item) -> bool:
    if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    path = getattr(item, "path", None)
    if path is None or path.suffix != ".py":
        return False
    tree = module_tree(str(path))
    if any(loads_tensorflow(name) for name in imports(tree, top_level_only=True)):
        return True
    name = getattr(item, "originalname", item.name)
    body = next(
        (
            n
            for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
        ),
        None,
    )
    if body is None:
        return False
    used = {n.id for n in ast.walk(body) if isinstance(n, ast.Name)}
    return bool(HEAVY_NAMES & used) or any(loads_tensorflow(m) for m in imports(body))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if is_heavy(item):
            item.add_marker(pytest.mark.slow)
