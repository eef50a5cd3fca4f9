"""The train function over HTTP (functions-framework's app, as the container serves it),
and `lensflow train` on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

from functions.train import dataset
from lensflow import scenes
from lensflow.cli import main as cli_main
from lensflow.seeding import seed_training_data
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from model_store import ModelStore

SOURCE = Path(__file__).resolve().parents[1] / "functions" / "train" / "main.py"


@pytest.fixture
def client(env, monkeypatch):
    import functions_framework

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = functions_framework.create_app(target="train", source=str(SOURCE))
    return app.test_client()


def ping_event(data: dict | None = None) -> CloudEvent:
    return CloudEvent(
        {
            "type": "dev.knative.sources.ping",
            "source": "/apis/v1/namespaces/default/pingsources/lensflow-train",
        },
        data or {},
    )


def labelled_only(env: dict[str, str]) -> Config:
    config = Config.from_env(env)
    s3 = s3_client(config)
    dataset.upload(s3, config.train_bucket, dataset.LABELED, scenes.labelled_set(2, 1), "x")
    return config


def test_healthz(client):
    reply = client.get("/healthz")
    assert reply.status_code == 200
    assert reply.get_json()["status"] == "ok" and reply.get_json()["running"] is False


def test_binary_ping_runs_a_round(client, env):
    labelled_only(env)
    headers, body = to_binary(ping_event())
    reply = client.post("/", headers=headers, data=body)
    assert reply.status_code == 200
    report = reply.get_json()
    assert report["outcome"] == "skipped" and "no holdout" in report["reason"]
    assert report["trigger"]["kind"] == "cloudevent"
    assert report["trigger"]["type"] == "dev.knative.sources.ping"


def test_structured_ping_and_plain_post(client, env):
    labelled_only(env)
    headers, body = to_structured(ping_event({"force": True}))
    reply = client.post("/", headers=headers, data=body)
    assert reply.status_code == 200 and reply.get_json()["trigger"]["force"] is True
    reply = client.post("/", data=b"")
    assert reply.status_code == 200 and reply.get_json()["trigger"] == {
        "kind": "post",
        "force": False,
    }
    assert client.get("/healthz").get_json()["rounds"] == 2


def test_second_trigger_while_running_is_skipped_not_409(client):
    main = sys.modules["main"]  # functions-framework loads the source file as module "main"
    assert main.__file__ == str(SOURCE)
    with main._round_lock:
        reply = client.post("/", data=b"{}")
    assert reply.status_code == 200
    assert reply.get_json()["skipped"] == "a round is already running"


def test_store_unreachable_is_503(env, monkeypatch):
    import functions_framework

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LENSFLOW_S3_ENDPOINT", "http://127.0.0.1:1")
    client = functions_framework.create_app(target="train", source=str(SOURCE)).test_client()
    reply = client.post("/", data=b"")
    assert reply.status_code == 503
    assert "unavailable" in reply.get_json()["error"]


def test_cli_train_once_json(env, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    labelled_only(env)
    assert cli_main(["train", "--once", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outcome"] == "skipped" and report["promoted"] is False
    assert report["data"]["labeled_total"] == 2 * len(scenes.CLASSES)


@pytest.mark.slow
def test_cli_train_once_promotes_first_model(env, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LENSFLOW_TRAIN_EPOCHS", "6")
    config = Config.from_env(env)
    seed_training_data(config, 15, 10, seed=2)
    assert cli_main(["train", "--once"]) == 0
    out = capsys.readouterr().out
    assert "promoted: no champion yet" in out
    assert "challenger v1" in out and "pointer: v1" in out
    assert ModelStore.from_config(config).current().version == "v1"
