"""`lensflow models ...` as an operator runs it, against a real S3 server."""

from __future__ import annotations

import json

import pytest

from tests.support.cli import lensflow
from tests.support.env import LABELS


@pytest.fixture
def files(tmp_path, tiny_models):
    for name, model in tiny_models.items():
        (tmp_path / f"{name}.tflite").write_bytes(model)
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (tmp_path / "two-labels.txt").write_text("a\nb\n")
    return tmp_path


def test_operator_workflow_publish_flip_rollback_history(env, files):
    out = lensflow(
        env,
        "models",
        "publish",
        str(files / "first.tflite"),
        "--labels",
        str(files / "labels.txt"),
        "--promote",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "version": "v1",
        "sha256": json.loads(out.stdout)["sha256"],
        "promoted": True,
    }
    assert (
        lensflow(
            env,
            "models",
            "publish",
            str(files / "last.tflite"),
            "--labels",
            str(files / "labels.txt"),
        ).stdout.strip()
        == "v2"
    )
    stale = lensflow(env, "models", "flip", "v2", "--expect", "v2")
    assert stale.returncode != 0 and "ConflictError" in stale.stderr
    assert [line for line in stale.stderr.splitlines() if "error" in line] == [
        "lensflow: error: ConflictError: pointer is at v1, not v2"
    ]
    flip = lensflow(env, "models", "flip", "v2", "--expect", "v1", "--reason", "better", "--json")
    assert json.loads(flip.stdout)["version"] == "v2"
    assert json.loads(lensflow(env, "models", "current", "--json").stdout)["previous"] == "v1"
    assert lensflow(env, "models", "rollback", "--reason", "oops").returncode == 0
    history = json.loads(lensflow(env, "models", "history", "--json").stdout)
    assert [(h["version"], h["flipped_by"], h["reason"]) for h in history] == [
        ("v1", "tester", "published with --promote"),
        ("v2", "tester", "better"),
        ("v1", "tester", "oops"),
    ]
    listing = json.loads(lensflow(env, "models", "list", "--json").stdout)
    assert [(v["version"], v["current"]) for v in listing] == [("v1", True), ("v2", False)]
    assert "v1: ok" in lensflow(env, "models", "verify").stdout
    assert lensflow(env, "models", "pin", "--reason", "audit").returncode == 0
    assert json.loads(lensflow(env, "models", "current", "--json").stdout)["pinned"] is True


def test_bad_input_exits_non_zero_with_one_line(env, files):
    bad = lensflow(
        env,
        "models",
        "publish",
        str(files / "first.tflite"),
        "--labels",
        str(files / "two-labels.txt"),
    )
    assert bad.returncode != 0 and "2 labels for a model with 3 outputs" in bad.stderr
    missing = lensflow(env, "models", "flip", "v7", "--json")
    assert missing.returncode != 0 and "no version v7" in json.loads(missing.stdout)["error"]
    nofile = lensflow(
        env, "models", "publish", str(files / "nope.tflite"), "--labels", str(files / "labels.txt")
    )
    assert nofile.returncode != 0 and "nope.tflite" in nofile.stderr
    assert lensflow(env, "models", "current").returncode != 0
