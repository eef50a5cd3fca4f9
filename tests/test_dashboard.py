"""The live dashboard in a real browser (headless Chromium), on real S3, broker and function."""

from __future__ import annotations

import json
import re

import pytest
from starlette.testclient import TestClient

from lensflow.dashboard import DashboardServer, DashboardState, make_app
from lensflow.process import free_port
from lensflow.scenes import scene_jpeg
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.topics import ensure_topics, topic_specs
from lensflow_model_store import ModelStore
from tests.support.browser import Browser
from tests.support.env import LABELS
from tests.support.functions_harness import FunctionServer, put_and_notify

TOKEN = "correct horse battery staple"
EVIL_KEYS = (
    'flight 7/<script>window.__xss = "script"</script>.jpg',
    "flight 7/<img src=x onerror=\"window.__xss='img'\">.jpg",
)


@pytest.fixture
def live(kafka_env, tiny_models, tmp_path):
    env = {**kafka_env, "LENSFLOW_DASHBOARD_TOKEN": TOKEN}
    config = Config.from_env(env)
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    store = ModelStore.from_config(config)
    store.publish(tiny_models["first"], LABELS)
    store.publish(tiny_models["last"], LABELS)
    store.flip("v1", reason="test")
    with FunctionServer("predict", env, tmp_path / "predict.log") as server:
        dashboard = DashboardServer(config, port=free_port()).start()
        try:
            yield config, store, server, dashboard
        finally:
            dashboard.stop()


def test_the_page_shows_predictions_and_flips_only_with_the_token(live, tmp_path):
    config, store, server, dashboard = live
    s3 = s3_client(config)
    bucket = config.image_buckets[0]
    for i, key in enumerate(EVIL_KEYS):
        reply = put_and_notify(
            server.url, config, s3, bucket, key, scene_jpeg("water", i, (320, 240))
        )
        assert reply.status_code == 200, reply.text
    with Browser() as browser:
        browser.goto(dashboard.url)
        browser.wait_for("document.querySelectorAll('#feed .pred').length >= 2")
        keys = browser.evaluate(
            "[...document.querySelectorAll('#feed .key')].map(e => e.textContent)"
        )
        assert sorted(keys) == sorted(EVIL_KEYS)  # shown as text, exactly
        assert browser.evaluate("window.__xss === undefined")
        assert (
            browser.evaluate("document.querySelectorAll('#feed script, #feed [onerror]').length")
            == 0
        )
        browser.wait_for(
            "[...document.querySelectorAll('#feed img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        assert browser.evaluate("document.querySelector('#feed .label').textContent").startswith(
            "field"
        )
        browser.wait_for("document.getElementById('pointer-version').textContent === 'v1'")
        # standalone: the KafkaSource group's lag, from the broker (nothing on images yet)
        browser.wait_for("document.getElementById('lag').textContent === '0'")
        browser.wait_for("document.querySelectorAll('#flip-version option').length === 2")

        # without the token: refused, nothing changes
        browser.evaluate(
            "document.getElementById('flip-version').value = 'v2';"
            "document.getElementById('flip').click()"
        )
        browser.wait_for(
            "document.getElementById('flip-status').textContent.includes('refused (401)')"
        )
        assert store.current().version == "v1"

        # with it: the pointer moves and the page shows the new version
        browser.evaluate(
            f"document.getElementById('token').value = {json.dumps(TOKEN)};"
            "document.getElementById('flip-version').value = 'v2';"
            "document.getElementById('flip').click()"
        )
        browser.wait_for("document.getElementById('pointer-version').textContent === 'v2'")
        assert store.current().version == "v2"
        assert store.current().flipped_by == "dashboard"

        # a stale view cannot overwrite a newer flip: the page still believes v1 is served
        browser.evaluate(
            "shown = 'v1'; document.getElementById('flip-version').value = 'v1';"
            "document.getElementById('flip').click()"
        )
        browser.wait_for(
            "document.getElementById('flip-status').textContent.includes('refused (409)')"
        )
        assert store.current().version == "v2"
        browser.wait_for("document.querySelectorAll('#history tr').length >= 2")
        for i in range(3):  # a few more predictions, on v2, for the picture
            put_and_notify(
                server.url,
                config,
                s3,
                bucket,
                f"flight 8/{i}.jpg",
                scene_jpeg("forest", i, (320, 240)),
            )
        browser.wait_for("document.querySelectorAll('#feed .pred').length >= 5")
        # counts per class add up to what arrived (2 of the always-class-0 model, 3 of v2's)
        counts = browser.wait_for(
            "(() => { const c = {}; for (const b of document.querySelectorAll('#counts .bar'))"
            " c[b.firstChild.textContent] = Number(b.lastChild.textContent);"
            " return Object.values(c).reduce((a, b) => a + b, 0) >= 5 && c; })()"
        )
        assert counts == {"field": 2, "water": 3}
        browser.wait_for(
            "[...document.querySelectorAll('#feed img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        browser.screenshot(tmp_path / "dashboard.png")  # bench/results/ keeps one by hand
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_flips_are_off_without_a_configured_token_and_thumbnails_are_bounded(env, tiny_models):
    config = Config.from_env(env)  # no LENSFLOW_DASHBOARD_TOKEN
    store = ModelStore.from_config(config)
    store.publish(tiny_models["first"], LABELS)
    store.flip("v1", reason="test")
    client = TestClient(make_app(DashboardState(config)))
    reply = client.post("/api/flip", json={"version": "v1", "expect": "v1"})
    assert reply.status_code == 403 and "LENSFLOW_DASHBOARD_TOKEN" in reply.json()["error"]
    assert client.post("/api/rollback", json={"expect": "v1"}).status_code == 403
    assert client.get("/thumb", params={"bucket": "private", "key": "x.jpg"}).status_code == 404
    s3 = s3_client(config)
    bucket = config.image_buckets[0]
    s3.put_object(Bucket=bucket, Key="a.jpg", Body=scene_jpeg("road", 1, (640, 480)))
    s3.put_object(Bucket=bucket, Key="b.pdf", Body=b"%PDF not an image" * 10)
    thumb = client.get("/thumb", params={"bucket": bucket, "key": "a.jpg"})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    import io

    from PIL import Image

    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 160
    assert client.get("/thumb", params={"bucket": bucket, "key": "b.pdf"}).status_code == 415
    assert client.get("/thumb", params={"bucket": bucket, "key": "gone.jpg"}).status_code == 404
    page = client.get("/")
    assert page.status_code == 200
    # names of images, classes and reasons go in as text: no script writes markup
    scripts = re.findall(r'<script src="/?([^"]+)"', page.text)
    assert "dashboard.js" in scripts and "learning.js" in scripts, scripts
    for script in scripts:
        text = client.get(f"/{script}").text
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
            assert sink not in text, (script, sink)


def test_standalone_the_lag_is_the_kafkasource_groups(kafka_env):
    """The dashboard without a stack asks the lag of LENSFLOW_SOURCE_GROUP (the KafkaSource's
    consumerGroup, as the local dispatcher joins it), not of the source's name."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    from lensflow_core.kafka import client_settings

    config = Config.from_env(kafka_env)
    assert config.source_group != config.source_name
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    producer = Producer(client_settings(config.kafka))
    for i in range(3):
        producer.produce(config.topic_images, value=b"{}", key=str(i).encode(), partition=0)
        assert producer.flush(10) == 0
    consumer = Consumer(client_settings(config.kafka, {"group.id": config.source_group}))
    consumer.commit(offsets=[TopicPartition(config.topic_images, 0, 1)], asynchronous=False)
    consumer.close()
    assert DashboardState(config)._standalone_lag() == 2  # the other group would say 3
