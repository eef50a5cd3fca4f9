"""The train function over HTTP (`lensflow serve train`: a request starts the training Job's
entry point in a child and answers 202), and `lensflow train` on the command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

from lensflow import scenes
from lensflow.cli import main as cli_main
from lensflow.seeding import seed_training_data
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_model_store import ModelStore, layout
from lensflow_train import dataset

SOURCE = Path(__file__).resolve().parents[1] / "functions" / "train" / "lensflow_train" / "main.py"


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
        data if data is not None else {"reason": "schedule"},
    )


def labelled_only(env: dict[str, str]) -> Config:
    config = Config.from_env(env)
    s3 = s3_client(config)
    dataset.upload(s3, config.train_bucket, layout.LABELED, scenes.labelled_set(2, 1), "x")
    return config


def wait_idle(client, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.get("/healthz").get_json()
        if state["running"] is None:
            return state
        time.sleep(0.2)
    raise AssertionError("the round did not end")


def test_healthz(client):
    reply = client.get("/healthz")
    assert reply.status_code == 200
    assert reply.get_json()["status"] == "ok" and reply.get_json()["running"] is None


def test_a_ping_starts_the_job_answers_202_and_healthz_answers_while_it_runs(client, env):
    labelled_only(env)
    headers, body = to_binary(ping_event())
    started = time.monotonic()
    reply = client.post("/", headers=headers, data=body)
    assert reply.status_code == 202 and time.monotonic() - started < 2
    assert reply.get_json()["trigger"]["reason"] == "schedule"
    assert reply.get_json()["trigger"]["type"] == "dev.knative.sources.ping"
    health = client.get("/healthz")
    assert health.status_code == 200 and health.get_json()["running"]["pid"] > 0
    again = client.post("/", json={"reason": "manual"})
    assert again.status_code == 200 and again.get_json()["skipped"] == "a round is already running"
    state = wait_idle(client)
    assert state["rounds"] == 1 and state["last"]["exit_code"] == 0
    assert state["last"]["outcome"] == "skipped" and "no holdout" in state["last"]["reason"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'lensflow_train_rounds_total{outcome="skipped"}' in metrics  # counted as it ended


def test_structured_ping_and_plain_post(client, env):
    labelled_only(env)
    headers, body = to_structured(ping_event({"reason": "manual", "force": True}))
    reply = client.post("/", headers=headers, data=body)
    assert reply.status_code == 202 and reply.get_json()["trigger"]["force"] is True
    wait_idle(client)
    reply = client.post("/", data=b"")  # an empty plain POST is a manual round
    assert reply.status_code == 202
    assert reply.get_json()["trigger"]["reason"] == "manual"
    assert reply.get_json()["trigger"]["force"] is False
    assert wait_idle(client)["rounds"] == 2


def test_store_unreachable_fails_the_round_not_the_server(env, monkeypatch):
    import functions_framework

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LENSFLOW_S3_ENDPOINT", "http://127.0.0.1:1")
    client = functions_framework.create_app(target="train", source=str(SOURCE)).test_client()
    assert client.post("/", data=b"").status_code == 202
    last = wait_idle(client)["last"]
    assert last["exit_code"] == 1 and last["outcome"] == "failed"
    assert "training lease" in last["reason"]


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b"not json", "application/json"),
        (b'{"reason": 5}', "application/json"),
        (b'{"force": true}', "application/json"),
        (b'{"specversion": "1.0"}', "application/cloudevents+json"),
    ],
)
def test_a_bad_request_is_400_and_starts_nothing(client, body, content_type):
    reply = client.post("/", data=body, headers={"Content-Type": content_type})
    assert reply.status_code == 400 and reply.get_json()["error"]
    assert client.get("/healthz").get_json()["running"] is None


def test_cli_train_once_json(env, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    labelled_only(env)
    assert cli_main(["train", "--once", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outcome"] == "skipped" and report["promoted"] is False
    assert report["data"]["labeled_total"] == 2 * len(scenes.CLASSES)
    # the same facts as the stored report, as `lensflow models history --json` shows it
    assert report["decision"] == "refused: no data"
    assert cli_main(["models", "history", "--json"]) == 0
    (kept,) = [r for r in json.loads(capsys.readouterr().out) if r["kind"] == "round"]
    assert (kept["round_id"], kept["decision"]) == (report["round_id"], report["decision"])


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
