"""The dashboard's labelling API and quality API, on a real S3 server (no browser)."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from lensflow.dashboard import DashboardState, make_app
from lensflow.dashboard_learning import next_cron
from lensflow.scenes import scene_jpeg
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config
from lensflow_model_store import ModelStore
from lensflow_model_store.decisions import DecisionLog
from lensflow_model_store.label_queue import LabelQueue
from tests.support.env import LABELS

TOKEN = "s3cret token"
EVIL_KEY = 'flight 9/<img src=x onerror="window.__xss=1">.jpg'
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def scores(*values: float) -> list[dict]:
    return [{"label": LABELS[i], "score": v} for i, v in enumerate(values)]


@pytest.fixture
def labelling(env, tiny_models):
    """A serving model, three queued photos, and the dashboard's app with a token."""
    config = Config.from_env({**env, "LENSFLOW_DASHBOARD_TOKEN": TOKEN})
    s3 = s3_client(config)
    ensure_buckets(s3, [config.train_bucket])
    store = ModelStore.from_config(config)
    store.flip(store.publish(tiny_models["first"], LABELS).version, reason="test")
    bucket = config.image_buckets[0]
    queue = LabelQueue(s3, config.train_bucket, limit=50)
    model = {"name": "aerial", "version": "v1", "sha256": "ab" * 32}
    for i, top in enumerate((0.5, 0.4, 0.34)):
        key = f"day 1/p{i}.jpg"
        etag = s3.put_object(Bucket=bucket, Key=key, Body=scene_jpeg("water", i, (320, 240)))
        queue.offer(bucket, key, etag["ETag"], model, scores(top, 0.33, 1 - top - 0.33))
    s3.put_object(Bucket=bucket, Key="unqueued.jpg", Body=scene_jpeg("road", 1, (320, 240)))
    client = TestClient(make_app(DashboardState(config)))
    return config, s3, queue, client, bucket


def train_keys(config, s3, prefix: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=config.train_bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_the_queue_most_uncertain_first_and_only_queued_images_are_served(labelling):
    config, s3, queue, client, bucket = labelling
    view = client.get("/api/queue").json()
    assert [e["key"] for e in view["entries"]] == ["day 1/p2.jpg", "day 1/p1.jpg", "day 1/p0.jpg"]
    assert view["classes"] == LABELS and view["labelling_enabled"] is True
    assert [p["label"] for p in view["entries"][0]["top"]] == LABELS
    image = client.get("/queue-image", params={"record": view["entries"][0]["record"]})
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    for record in ("labeled/water/x.jpg", "to-label/../current.json", "to-label/v1/nope.json"):
        assert client.get("/queue-image", params={"record": record}).status_code == 404


def test_label_and_undo_answer_every_status_and_write_only_on_success(labelling):
    config, s3, queue, client, bucket = labelling
    image = f"{bucket}/day 1/p2.jpg"
    good = {"image": image, "class": "forest", "holdout": False, "by": "ana"}
    assert client.post("/api/label", json=good).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post("/api/label", json=good, headers=wrong).status_code == 401
    bad_bodies = [
        b"not json",
        b"[1, 2]",
        json.dumps({"image": image}).encode(),
        json.dumps({**good, "holdout": "yes"}).encode(),
        json.dumps({**good, "extra": 1}).encode(),
        json.dumps({**good, "class": "lake"}).encode(),  # unknown class
        json.dumps({**good, "image": "no-slash"}).encode(),
    ]
    before = train_keys(config, s3, "")
    for body in bad_bodies:
        reply = client.post("/api/label", content=body, headers=AUTH)
        assert reply.status_code == 422, (body, reply.text)
        assert reply.json()["error"]
    not_queued = client.post(
        "/api/label", json={**good, "image": f"{bucket}/unqueued.jpg"}, headers=AUTH
    )
    assert (
        not_queued.status_code == 409 and "not on the labelling queue" in not_queued.json()["error"]
    )
    assert train_keys(config, s3, "") == before and len(queue.pending()) == 3

    done = client.post("/api/label", json=good, headers=AUTH)
    assert done.status_code == 200, done.text
    assert done.json()["stored"] == f"{config.train_bucket}/labeled/forest/p2.jpg"
    assert train_keys(config, s3, "labeled/") == ["labeled/forest/p2.jpg"]
    assert image not in [e.path for e in queue.pending()]
    [decision] = DecisionLog(queue.objects).of(bucket, "day 1/p2.jpg")
    assert (decision.by, decision.cls, decision.action) == ("dashboard:ana", "forest", "label")
    assert decision.at.endswith("Z")

    stored = train_keys(config, s3, "")  # the copy, the decision, the queue as they are
    replay = client.post("/api/label", json=good, headers=AUTH)
    assert replay.status_code == 409 and replay.json()["error"]
    other_class = client.post("/api/label", json={**good, "class": "water"}, headers=AUTH)
    assert other_class.status_code == 409  # no relabel from the page
    assert train_keys(config, s3, "") == stored  # a replay writes nothing, not even a decision

    # undo: the copy goes, the photo is queued again, and the undo is a decision too
    assert client.post("/api/label/undo", content=b"{", headers=AUTH).status_code == 422
    assert client.post("/api/label/undo", json={"image": image}).status_code == 401
    undone = client.post("/api/label/undo", json={"image": image, "by": "ana"}, headers=AUTH)
    assert undone.status_code == 200 and undone.json()["requeued"] == 1
    assert train_keys(config, s3, "labeled/") == []
    assert image in [e.path for e in queue.pending()]
    assert client.post("/api/label/undo", json={"image": image}, headers=AUTH).status_code == 409
    log = DecisionLog(queue.objects).of(bucket, "day 1/p2.jpg")
    assert [(d.sequence, d.action) for d in log] == [(1, "label"), (2, "undo")]

    # a deliberate holdout label goes to holdout/, and never also into labeled/
    held = client.post("/api/label", json={**good, "holdout": True}, headers=AUTH)
    assert held.status_code == 200 and held.json()["key"] == "holdout/forest/p2.jpg"
    assert train_keys(config, s3, "holdout/") == ["holdout/forest/p2.jpg"]


def test_writing_is_off_without_a_configured_token(env):
    config = Config.from_env(env)
    client = TestClient(make_app(DashboardState(config)))
    reply = client.post("/api/label", json={"image": "a/b.jpg", "class": "water"})
    assert reply.status_code == 403 and "LENSFLOW_DASHBOARD_TOKEN" in reply.json()["error"]
    assert client.post("/api/label/undo", json={"image": "a/b.jpg"}).status_code == 403


def test_two_labellers_at_once_one_wins_the_other_gets_409(labelling, monkeypatch):
    """Both read the photo's decisions before either writes: the conditional PUT of
    decision 1 lets exactly one through."""
    config, s3, queue, client, bucket = labelling
    both_read = threading.Barrier(2, timeout=10)
    real_of = DecisionLog.of

    def of_then_wait(self, b, k):
        found = real_of(self, b, k)
        both_read.wait()
        return found

    monkeypatch.setattr(DecisionLog, "of", of_then_wait)
    replies: dict[str, int] = {}

    def labeller(cls: str) -> None:
        body = {"image": f"{bucket}/day 1/p1.jpg", "class": cls}
        replies[cls] = client.post("/api/label", json=body, headers=AUTH).status_code

    threads = [threading.Thread(target=labeller, args=(c,)) for c in ("forest", "water")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(replies.values()) == [200, 409]
    winner = next(c for c, status in replies.items() if status == 200)
    assert train_keys(config, s3, "labeled/") == [f"labeled/{winner}/p1.jpg"]


def test_next_scheduled_round_from_cron():
    at = datetime(2026, 12, 6, 7, 30, tzinfo=timezone.utc)
    assert next_cron("0 3 * * *", at) == datetime(2026, 12, 7, 3, 0, tzinfo=timezone.utc)
    assert next_cron("*/15 * * * *", at) == datetime(2026, 12, 6, 7, 45, tzinfo=timezone.utc)
    assert next_cron("0 9 * * 1", at) == datetime(2026, 12, 7, 9, 0, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        next_cron("61 * * * *", at)
    with pytest.raises(ValueError):
        next_cron("daily", at)


def a_champion_and_twelve_queued_photos(config: Config) -> tuple[str, dict[str, str]]:
    """A holdout, a serving model that learnt nothing, and twelve photos (two a class)
    queued as equally uncertain: (the champion's version, {photo: its true class})."""
    from lensflow import scenes
    from lensflow.seeding import seed_training_data
    from lensflow_train import model as M

    s3 = s3_client(config)
    seed_training_data(config, 0, 8, seed=3)  # a holdout only: no labels yet
    classes = sorted(scenes.CLASSES)
    store = ModelStore.from_config(config)
    untrained = M.to_tflite(M.build_model(len(classes), seed=3))
    champion = store.publish(untrained, classes, created_by="test").version
    store.flip(champion, reason="a champion that learnt nothing", by="test")
    bucket = config.image_buckets[0]
    queue = LabelQueue(s3, config.train_bucket, limit=50)
    model = {"name": "aerial", "version": champion, "sha256": "ab" * 32}
    truth: dict[str, str] = {}
    for i, (cls, body) in enumerate(scenes.labelled_set(2, seed=7)):
        key = f"flight 9/photo-{i:02d}.jpg" if i else EVIL_KEY  # names are text, never markup
        etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]
        guesses = [{"label": c, "score": 1 / len(classes)} for c in classes]
        queue.offer(bucket, key, etag, model, guesses)
        truth[f"{bucket}/{key}"] = cls
    return champion, truth


def label_everything_by_keyboard(browser, config, truth, screens: Path) -> None:
    """Press each shown photo's class key; the third photo first gets a wrong class,
    undone with Backspace (the labelling view's screenshot is taken just before)."""
    s3 = s3_client(config)
    queue = LabelQueue(s3, config.train_bucket, limit=50)
    classes = sorted(set(truth.values()))
    wrong_once = True
    for _ in range(len(truth) + 1):  # one more: the undone label
        shown = browser.wait_for(
            "(() => { const i = document.getElementById('label-image');"
            " return i.complete && i.naturalWidth > 0 &&"
            " document.getElementById('label-key').textContent; })()"
        )
        if len(truth) - len(queue.pending()) == 2 and wrong_once:
            browser.screenshot(screens / "dashboard-labelling.png")
            wrong = classes[(classes.index(truth[shown]) + 1) % len(classes)]
            label_with_key(browser, classes, wrong, shown)
            assert key_of(s3, config, wrong, shown)  # stored ... then undone
            browser.press("Backspace")
            browser.wait_for(
                "document.getElementById('label-status').textContent.startsWith('undone')"
            )
            assert not key_of(s3, config, wrong, shown)
            assert shown in [e.path for e in queue.pending()]
            # queued again, it is the most uncertain (ties go by name) once reloaded
            browser.wait_for(
                "!labelling.busy && "
                f"document.getElementById('label-key').textContent === {json.dumps(shown)}"
            )
            wrong_once = False
            continue
        label_with_key(browser, classes, truth[shown], shown)
    assert not wrong_once and queue.pending() == []


@pytest.mark.slow
def test_a_person_labels_queued_photos_with_the_keyboard_and_a_round_promotes_on_them(
    env, tmp_path
):
    """Done when: twelve queued photos labelled in the browser with the keyboard (one
    mislabelled, undone with Backspace and labelled again), then a round promotes on
    those labels and the quality view shows its figures."""
    from lensflow.dashboard import DashboardServer
    from lensflow.process import free_port
    from lensflow_train.round import run_round
    from tests.support.browser import Browser

    config = Config.from_env(
        {**env, "LENSFLOW_DASHBOARD_TOKEN": TOKEN, "LENSFLOW_TRAIN_MIN_NEW": "10"}
    )
    _, truth = a_champion_and_twelve_queued_photos(config)
    screens = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    dashboard = DashboardServer(config, port=free_port()).start()
    try:
        with Browser(width=1280, height=900) as browser:
            browser.goto(dashboard.url + "#label")
            browser.wait_for("document.querySelectorAll('#class-keys button').length === 6")
            browser.evaluate(
                f"document.getElementById('label-token').value = {json.dumps(TOKEN)};"
                "document.getElementById('labeller').value = 'ana'"
            )
            label_everything_by_keyboard(browser, config, truth, screens)
            assert browser.evaluate("window.__xss === undefined")
            labelled = train_keys(config, s3_client(config), "labeled/")
            assert sorted(labelled) == sorted(
                f"labeled/{cls}/{path.rsplit('/', 1)[1]}" for path, cls in truth.items()
            )
            report = run_round(config)
            assert report.outcome == "promoted", report.reason
            assert report.data["labeled_total"] == 12
            served = report.challenger["version"]
            assert ModelStore.from_config(config).current().version == served

            browser.goto(dashboard.url + "#quality")
            browser.wait_for("document.querySelectorAll('#rounds tr').length === 1")
            row = browser.evaluate(
                "[...document.querySelectorAll('#rounds tr td')].map(td => td.textContent)"
            )
            f1 = report.challenger["evaluation"]["macro_f1"]
            assert row[1] == "promoted" and f"F1 {f1:.3f}" in row[3]
            assert row[5] == "48" and row[6] == "12"  # holdout, labels used
            browser.wait_for("document.querySelectorAll('#confusion tr').length === 7")
            chart = "document.querySelector('#score-chart circle[r=\"6\"]').dataset.version"
            assert browser.evaluate(chart) == served
            browser.wait_for(
                f"document.getElementById('pointer-version').textContent === '{served}'"
            )
            browser.screenshot(screens / "dashboard-quality.png", full_page=True)
    finally:
        dashboard.stop()
    assert (screens / "dashboard-labelling.png").stat().st_size > 10_000


def key_of(s3, config, cls: str, path: str) -> bool:
    return f"labeled/{cls}/{path.rsplit('/', 1)[1]}" in train_keys(config, s3, "labeled/")


def label_with_key(browser, classes: list[str], cls: str, path: str) -> None:
    browser.press("123456789"[classes.index(cls)])
    browser.wait_for(
        "document.getElementById('label-status').textContent.startsWith("
        f"{json.dumps(path + ' -> ')})"
    )


@pytest.mark.slow
def test_rounds_that_did_not_train_show_why_on_the_page_and_in_models_history(labelling):
    from lensflow_train.round import run_round
    from tests.support.cli import lensflow

    config, s3, queue, client, bucket = labelling
    report = run_round(config)  # queued photos but nothing labelled, no holdout: no round
    quality = client.get("/api/quality").json()
    [shown] = quality["rounds"]
    assert shown["round_id"] == report.round_id == quality["last"]["round_id"]
    assert shown["decision"] == "refused: no data" and "no holdout" in shown["reason"]
    assert quality["serving"] == "v1" and quality["running"] is None
    assert quality["next"]["by"] == "cron 0 3 * * * (UTC)" and quality["next"]["at"].endswith("Z")
    env = {k: v for k, v in config.env.items() if k.startswith("LENSFLOW_")}
    out = lensflow(env, "models", "history", "--json")
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    assert [r["kind"] for r in records] == ["flip", "round"]
    assert records[1] == shown  # the same facts as the page
    text = lensflow(env, "models", "history").stdout
    assert f"round {report.round_id}" in text and "refused: no data" in text

    # a lease held by a running round is shown as running now
    lease = ModelStore.from_config(config).lease(60).acquire("round-in-a-test")
    assert client.get("/api/quality").json()["running"]["holder"] == lease.holder
