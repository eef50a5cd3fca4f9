"""The whole chain on the embedded stack: poison images, and a model that improves live."""

from __future__ import annotations

import base64
import json
import time

import pytest

from lensflow.stack import EmbeddedStack
from lensflow_core.s3 import s3_client
from lensflow_eventing.predictions import read_predictions
from tests.support.kafka_reading import read_topic
from tests.support.stack import predicted, publish_model, stack_env, upload

pytestmark = pytest.mark.slow


def test_poison_image_is_dead_lettered_with_its_reason_while_later_events_flow(
    tiny_models, tmp_path
):
    with EmbeddedStack(stack_env(), log_dir=tmp_path, idle_s=30) as stack:
        publish_model(stack, tiny_models["first"])
        assert stack.dispatcher.wait_assigned(30)
        config = stack.config
        bucket = config.image_buckets[0]
        upload(stack, ["before.jpg"])
        poison = b"this is not a photo" * 50
        s3_client(config).put_object(Bucket=bucket, Key="poison.jpg", Body=poison)  # announced
        upload(stack, ["after.jpg"])
        counts = predicted(stack, {"before.jpg", "after.jpg"})
        assert {f"{bucket}/before.jpg", f"{bucket}/after.jpg"} <= set(counts)
        assert f"{bucket}/poison.jpg" not in counts
        [letter] = read_topic(config, config.topic_dlq, 1, timeout_s=30)
        headers = {k: v.decode() for k, v in letter.headers()}
        assert letter.key() == f"{bucket}/poison.jpg".encode()
        assert headers["ce_knativeerrorcode"] == "415"
        assert headers["ce_knativeerrordest"] == stack.pool.url
        reason = json.loads(base64.b64decode(headers["ce_knativeerrordata"]))
        assert "not an image" in reason["error"]
        assert json.loads(letter.value())["Key"] == f"{bucket}/poison.jpg"  # the original record
        assert stack.stats()["dispatcher"]["dead_lettered"] == 1


def test_a_training_round_reaches_the_running_replica_without_a_restart(tiny_models, tmp_path):
    from lensflow.seeding import seed_training_data
    from lensflow_train.round import run_round

    env = stack_env(LENSFLOW_TRAIN_EPOCHS="6", LENSFLOW_TRAIN_MIN_NEW="1")
    with EmbeddedStack(env, log_dir=tmp_path, idle_s=120) as stack:
        publish_model(stack, tiny_models["first"])  # a poor champion: always "field"
        assert stack.dispatcher.wait_assigned(30)
        bucket = stack.config.image_buckets[0]
        upload(stack, ["one.jpg"])
        assert f"{bucket}/one.jpg" in predicted(stack, {"one.jpg"})
        [replica] = stack.pool.replicas()

        seed_training_data(stack.config, n_labeled_per_class=40, n_holdout_per_class=10)
        report = run_round(stack.config)
        assert report.outcome == "promoted", report.reason
        time.sleep(stack.config.pointer_ttl_s + 0.5)
        upload(stack, ["two.jpg"])
        predicted(stack, {"two.jpg"})
        versions = {
            p.subject: p.model_version
            for p in read_predictions(
                stack.config.kafka_bootstrap,
                stack.config.topic_predictions,
                from_beginning=True,
                timeout_s=5,
            )
        }
        assert versions[f"{bucket}/one.jpg"] == "v1"
        assert versions[f"{bucket}/two.jpg"] == "v2"
        assert [r.proc.pid for r in stack.pool.replicas()] == [replica.proc.pid]
        assert stack.pool.stats()["cold_starts"] == 1
