"""The labelling queue and labelling, against a real S3 server (and the CLI as people use it)."""

from __future__ import annotations

import json

import pytest

from lensflow.process import free_port
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_model_store import ModelStore
from lensflow_model_store.label_images import LabelRefused, label
from lensflow_model_store.label_queue import LabelQueue, is_uncertain, record_key
from tests.support.cli import lensflow
from tests.support.env import LABELS
from tests.support.waiting import wait_for


def model(version: str) -> dict[str, str]:
    return {"name": "aerial", "version": version, "sha256": "ab" * 32}


def scores(*values: float) -> list[dict]:
    return [{"label": LABELS[i], "score": v} for i, v in enumerate(values)]


def put(s3, bucket: str, key: str, body: bytes = b"jpeg bytes") -> str:
    return s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')


@pytest.fixture
def world(config):
    s3 = s3_client(config)
    bucket = config.image_buckets[0]
    queue = LabelQueue(s3, config.train_bucket, limit=3)
    return config, s3, bucket, queue


def relabel(world, cls, paths, split="labeled", known=LABELS):
    config, s3, _, queue = world
    return label(
        s3,
        train_bucket=config.train_bucket,
        image_buckets=config.image_buckets,
        known_labels=known,
        cls=cls,
        paths=paths,
        split=split,
        by="tester",
        queue=queue,
    )


def test_uncertain_by_top1_or_by_margin():
    assert not is_uncertain(scores(0.9, 0.05, 0.05), 0.6, 0.2)
    assert is_uncertain(scores(0.55, 0.25, 0.2), 0.6, 0.2)  # top-1 too low
    assert is_uncertain(scores(0.62, 0.38, 0.0), 0.6, 0.3)  # too close to the second
    assert not is_uncertain(scores(0.62, 0.38, 0.0), 0.6, 0.2)


def test_an_image_is_queued_once_per_version_and_the_queue_is_bounded(world):
    config, s3, bucket, queue = world
    etag = put(s3, bucket, "f/a.jpg")
    assert queue.offer(bucket, "f/a.jpg", etag, model("v1"), scores(0.4, 0.35, 0.25)) == "recorded"
    # re-delivery of the same event, by this replica or another: nothing is overwritten
    first = s3.get_object(Bucket=config.train_bucket, Key=record_key("v1", bucket, "f/a.jpg"))
    other_replica = LabelQueue(s3, config.train_bucket, limit=3)
    assert other_replica.offer(bucket, "f/a.jpg", etag, model("v1"), scores(0.5, 0.4, 0.1)) == (
        "duplicate"
    )
    again = s3.get_object(Bucket=config.train_bucket, Key=record_key("v1", bucket, "f/a.jpg"))
    assert again["ETag"] == first["ETag"]
    record = json.loads(again["Body"].read())
    assert record["bucket"] == bucket and record["key"] == "f/a.jpg" and record["etag"] == etag
    assert record["model"]["version"] == "v1" and [p["label"] for p in record["top"]] == LABELS
    assert record["top1"] == 0.4 and record["margin"] == pytest.approx(0.05)
    assert record["recorded_at"].endswith("Z")

    for key in ("f/b.jpg", "f/c.jpg"):
        assert queue.offer(bucket, key, "e", model("v1"), scores(0.4, 0.3, 0.3)) == "recorded"
    assert queue.offer(bucket, "f/d.jpg", "e", model("v1"), scores(0.4, 0.3, 0.3)) == "full"
    # a fresh replica seeds its count from a LIST: the queue is full for it too
    fresh = LabelQueue(s3, config.train_bucket, limit=3)
    assert fresh.offer(bucket, "f/e.jpg", "e", model("v1"), scores(0.4, 0.3, 0.3)) == "full"
    assert queue.size("v1") == 3
    # the bound is per model version
    assert queue.offer(bucket, "f/d.jpg", "e", model("v2"), scores(0.4, 0.3, 0.3)) == "recorded"
    assert queue.count() == 4


class Counted:
    """The queue's objects, counting the requests made through them."""

    def __init__(self, objects):
        self.objects, self.puts, self.batches, self.lists = objects, 0, 0, 0

    def put_many(self, items, **kwargs):
        self.puts += len(items)
        self.batches += 1
        return self.objects.put_many(items, **kwargs)

    def list_keys(self, prefix):
        self.lists += 1
        return self.objects.list_keys(prefix)


def test_the_predict_functions_libcurl_queue_writes_the_same_records_and_knows_when_full(world):
    """Through libcurl (the predict function's client), records are the same objects the
    operator's boto3 queue reads; a full queue or an image already queued costs no request
    until the replica's record is due for a LIST."""
    from lensflow_core.s3_get import ObjectGetter
    from lensflow_predict.curl_objects import CurlObjects

    config, s3, bucket, operator = world
    objects = Counted(CurlObjects(ObjectGetter(config), config.train_bucket))
    queue = LabelQueue(s3, config.train_bucket, limit=3, objects=objects)
    queue.relist_every = 100  # as with a limit of 800: no LIST after each of 3 writes
    etag = put(s3, bucket, "f/a.jpg")
    assert queue.known("v1", bucket, "f/a.jpg") is None  # nothing known before a LIST
    assert queue.offer(bucket, "f/a.jpg", etag, model("v1"), scores(0.4, 0.35, 0.25)) == (
        "recorded"
    )
    assert (objects.puts, objects.lists) == (1, 1)
    assert queue.known("v1", bucket, "f/a.jpg") == "duplicate"
    assert queue.offer(bucket, "f/a.jpg", etag, model("v1"), scores(0.5, 0.4, 0.1)) == ("duplicate")
    # another replica's write of the same image: the conditional PUT refuses it
    operator.offer(bucket, "f/b.jpg", "e", model("v1"), scores(0.4, 0.3, 0.3))
    assert queue.offer(bucket, "f/b.jpg", "e", model("v1"), scores(0.4, 0.3, 0.3)) == ("duplicate")
    assert objects.puts == 2
    assert queue.offer(bucket, "f/c.jpg", "e", model("v1"), scores(0.4, 0.3, 0.3)) == "recorded"
    puts, lists = objects.puts, objects.lists
    for i in range(50):
        assert queue.known("v1", bucket, f"g/{i}.jpg") == "full"
        assert queue.offer(bucket, f"g/{i}.jpg", "e", model("v1"), scores(0.4, 0.3, 0.3)) == (
            "full"
        )
    assert (objects.puts, objects.lists) == (puts, lists)  # a full queue costs nothing
    queue.RELIST_S = 0.0  # due for a LIST: a person labelled one meanwhile
    operator.remove(bucket, "f/a.jpg")
    assert queue.offer(bucket, "g/0.jpg", "e", model("v1"), scores(0.4, 0.3, 0.3)) == "recorded"
    pending = {e.key: e for e in operator.pending()}
    assert sorted(pending) == ["f/b.jpg", "f/c.jpg", "g/0.jpg"]
    assert pending["g/0.jpg"].model["version"] == "v1" and len(pending["g/0.jpg"].top) == 3
    record = s3.get_object(Bucket=config.train_bucket, Key=record_key("v1", bucket, "g/0.jpg"))
    assert record["ContentType"] == "application/json"


def test_a_batch_of_offers_is_written_in_one_go_and_settled_as_one_at_a_time(world):
    """The replica's writer hands the queue a batch: new records go out as one batch of
    requests; an image twice in the batch, one queued already and places past the limit
    are settled without a request; a store that cannot be reached fails each offer alone."""
    from lensflow_core.s3_get import ObjectGetter
    from lensflow_predict.curl_objects import CurlObjects

    config, s3, bucket, operator = world
    objects = Counted(CurlObjects(ObjectGetter(config), config.train_bucket))
    queue = LabelQueue(s3, config.train_bucket, limit=3, objects=objects)
    operator.offer(bucket, "b/queued.jpg", "e", model("v1"), scores(0.4, 0.3, 0.3))
    offers = [
        (bucket, key, "e", model(version), scores(0.4, 0.3, 0.3))
        for key, version in [
            ("b/1.jpg", "v1"),
            ("b/1.jpg", "v1"),
            ("b/queued.jpg", "v1"),
            ("b/2.jpg", "v1"),
            ("b/3.jpg", "v1"),  # the queued one and two new ones fill v1's three places
            ("b/1.jpg", "v2"),
        ]
    ]
    outcomes = queue.offer_many(offers)
    assert outcomes == ["recorded", "duplicate", "duplicate", "recorded", "full", "recorded"]
    assert objects.puts == 3 and objects.batches == 1
    assert sorted((e.key, e.model["version"]) for e in operator.entries()) == [
        ("b/1.jpg", "v1"),
        ("b/1.jpg", "v2"),
        ("b/2.jpg", "v1"),
        ("b/queued.jpg", "v1"),
    ]
    assert queue.offer_many(offers[:1]) == ["duplicate"] and objects.batches == 1
    away = {**config.env, "LENSFLOW_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    getter = ObjectGetter(Config.from_env(away), timeout_s=2)
    lost = LabelQueue(s3, config.train_bucket, 3, CurlObjects(getter, config.train_bucket))
    failed = lost.offer_many(offers[:2])
    assert [type(f).__name__ for f in failed] == ["StoreUnavailableError"] * 2


def test_a_replica_writes_at_most_its_rate_and_counts_the_rest_paced(world):
    """A new model finds everything uncertain: a burst of offers writes a second's worth
    of records, as one batch; the rest are counted ``paced`` at once (no request, no
    thread)."""
    from lensflow_core.s3_get import ObjectGetter
    from lensflow_eventing.contracts import ObjectEvent
    from lensflow_predict import metrics
    from lensflow_predict.curl_objects import CurlObjects
    from lensflow_predict.labels import LabelWriter

    config, s3, bucket, _ = world
    objects = Counted(CurlObjects(ObjectGetter(config), config.train_bucket))
    queue = LabelQueue(s3, config.train_bucket, limit=1000, objects=objects)
    writer = LabelWriter(queue, rate=5)
    before = metrics.counts(metrics.LABEL_QUEUE)
    for i in range(40):
        record = ObjectEvent("s3:ObjectCreated:Put", bucket, f"burst/{i}.jpg", "e")
        writer.offer(record, "e", model("v9"), scores(0.4, 0.3, 0.3))
    wait_for(lambda: queue.size("v9") >= 5, 10, "the first second's writes never landed")

    def counted(outcome: str) -> int:
        return metrics.counts(metrics.LABEL_QUEUE).get(outcome, 0) - before.get(outcome, 0)

    wait_for(lambda: counted("recorded") >= 5, 5, "writes not counted")
    assert 5 <= queue.size("v9") <= 6 and counted("paced") >= 34  # a token may refill
    assert counted("recorded") + counted("paced") == 40
    assert objects.batches == 1  # the burst's records went out together


def test_list_is_most_uncertain_first_one_entry_per_image(world):
    _, s3, bucket, queue = world
    queue.offer(bucket, "sure-ish.jpg", "e1", model("v1"), scores(0.55, 0.1, 0.35))
    queue.offer(bucket, "torn.jpg", "e2", model("v1"), scores(0.45, 0.44, 0.11))
    queue.offer(bucket, "sure-ish.jpg", "e1", model("v2"), scores(0.5, 0.3, 0.2))
    pending = queue.pending()
    assert [e.key for e in pending] == ["torn.jpg", "sure-ish.jpg"]
    assert pending[1].model["version"] == "v2"  # the newest model's opinion


def test_labelling_copies_keeps_the_name_and_takes_the_image_off_the_queue(world):
    config, s3, bucket, queue = world
    etag = put(s3, bucket, "flights/d1/p-001.jpg", b"photo one")
    queue.offer(bucket, "flights/d1/p-001.jpg", etag, model("v1"), scores(0.4, 0.3, 0.3))
    queue.offer(bucket, "flights/d1/p-001.jpg", etag, model("v2"), scores(0.4, 0.3, 0.3))
    done = relabel(world, "forest", [f"{bucket}/flights/d1/p-001.jpg"])
    assert [d.target for d in done] == ["labeled/forest/p-001.jpg"] and done[0].dequeued == 2
    copied = s3.get_object(Bucket=config.train_bucket, Key="labeled/forest/p-001.jpg")
    assert copied["Body"].read() == b"photo one"
    assert copied["Metadata"]["labelled-by"] == "tester"
    assert queue.pending() == []
    assert s3.head_object(Bucket=bucket, Key="flights/d1/p-001.jpg")  # the original stays

    # again: nothing changes; relabelled as field: it moves
    assert relabel(world, "forest", [f"s3://{bucket}/flights/d1/p-001.jpg"])[0].unchanged
    moved = relabel(world, "field", [f"{bucket}/flights/d1/p-001.jpg"])
    assert moved[0].replaced == ["labeled/forest/p-001.jpg"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=config.train_bucket)["Contents"]]
    assert "labeled/field/p-001.jpg" in keys and "labeled/forest/p-001.jpg" not in keys


@pytest.mark.parametrize(
    "cls, path, reason",
    [
        ("lake", "{bucket}/ok.jpg", "unknown class 'lake'"),
        ("forest", "{bucket}/missing.jpg", "no such object"),
        ("forest", "private/ok.jpg", "not one of the image buckets"),
        ("forest", "just-a-name", "not <bucket>/<key>"),
    ],
)
def test_a_bad_image_refuses_the_whole_request(world, cls, path, reason):
    config, s3, bucket, queue = world
    etag = put(s3, bucket, "ok.jpg")
    put(s3, bucket, "good.jpg")
    queue.offer(bucket, "ok.jpg", etag, model("v1"), scores(0.4, 0.3, 0.3))
    with pytest.raises(LabelRefused, match=reason):
        relabel(world, cls, [f"{bucket}/good.jpg", path.format(bucket=bucket)])
    listed = s3.list_objects_v2(Bucket=config.train_bucket, Prefix="labeled/")
    assert listed.get("KeyCount", 0) == 0  # not even the good one
    assert [e.key for e in queue.pending()] == ["ok.jpg"]


def test_a_shared_bucket_refuses_its_own_training_objects(env):
    """Train bucket = image bucket: what lensflow wrote there is no image to label."""
    from lensflow_core.settings import Config

    config = Config.from_env({**env, "LENSFLOW_TRAIN_BUCKET": env["LENSFLOW_IMAGE_BUCKETS"]})
    s3 = s3_client(config)
    bucket = config.image_buckets[0]
    world = (config, s3, bucket, LabelQueue(s3, bucket, limit=3))
    put(s3, bucket, "labeled/forest/x.jpg")
    with pytest.raises(LabelRefused, match="already a training object"):
        relabel(world, "water", [f"{bucket}/labeled/forest/x.jpg"])


def test_holdout_and_training_data_never_share_an_image(world):
    config, s3, bucket, _ = world
    put(s3, bucket, "a.jpg", b"A")
    put(s3, bucket, "b.jpg", b"B")
    relabel(world, "water", [f"{bucket}/a.jpg"], split="holdout")
    assert s3.head_object(Bucket=config.train_bucket, Key="holdout/water/a.jpg")
    with pytest.raises(LabelRefused, match="training data or holdout, never both"):
        relabel(world, "water", [f"{bucket}/a.jpg"])
    # a different image that happens to share a name with a labelled one is refused too
    relabel(world, "field", [f"{bucket}/b.jpg"])
    put(s3, bucket, "other/b.jpg", b"not B")
    with pytest.raises(LabelRefused, match="already holds a different image"):
        relabel(world, "field", [f"{bucket}/other/b.jpg"])


def test_cli_label_list_and_label(env, tiny_models):
    from lensflow_core.settings import Config

    config = Config.from_env(env)
    s3 = s3_client(config)
    bucket = config.image_buckets[0]
    queue = LabelQueue(s3, config.train_bucket, limit=10)
    for i, top in enumerate((0.5, 0.34)):
        etag = put(s3, bucket, f"day/p{i}.jpg")
        queue.offer(bucket, f"day/p{i}.jpg", etag, model("v1"), scores(top, 0.33, 0.17))

    out = lensflow(env, "label", "list", "--json")
    assert out.returncode == 0, out.stderr
    assert [e["key"] for e in json.loads(out.stdout)] == ["day/p1.jpg", "day/p0.jpg"]
    text = lensflow(env, "label", "list")
    assert f"{bucket}/day/p1.jpg" in text.stdout.splitlines()[1]

    out = lensflow(env, "label", "holdout", "forest", f"{bucket}/day/p1.jpg", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["target"] == "holdout/forest/p1.jpg"

    # with a model serving, its labels are the classes there are
    store = ModelStore.from_config(config)
    store.flip(store.publish(tiny_models["first"], LABELS).version, reason="test")
    bad = lensflow(env, "label", "solar_farm", f"{bucket}/day/p0.jpg")
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0
    assert "refused, nothing labelled: unknown class 'solar_farm'" in bad.stderr
    assert [e.key for e in queue.pending()] == ["day/p0.jpg"]
    out = lensflow(env, "label", "water", f"{bucket}/day/p0.jpg")
    assert out.returncode == 0 and "labeled/water/p0.jpg" in out.stdout
    assert queue.pending() == []
    # undo: the copy goes and the photo is queued again; twice is refused in one line
    out = lensflow(env, "label", "undo", f"{bucket}/day/p0.jpg")
    assert out.returncode == 0 and "undid labeled/water/p0.jpg" in out.stdout, out.stderr
    assert [e.key for e in queue.pending()] == ["day/p0.jpg"]
    again = lensflow(env, "label", "undo", f"{bucket}/day/p0.jpg")
    assert again.returncode != 0 and "no label of it to undo" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("train_bucket", ["same", "missing"])
def test_the_predict_function_queues_uncertain_images_once(
    s3_server, kafka_broker, tiny_models, tmp_path, train_bucket
):
    """Every prediction of a 3-class model is below a top-1 of 1.01: all are uncertain.
    The queue is written after the answer (off the request's path); a queue that cannot
    be written (no such bucket) never fails the prediction."""
    from cloudevents.http import from_http

    from lensflow.scenes import scene_jpeg
    from tests.support.functions_harness import FunctionServer, put_and_notify

    env, config, s3 = _uncertain_stack(s3_server, kafka_broker, tiny_models, train_bucket)
    bucket = config.image_buckets[0]
    photo = scene_jpeg("water", 3, (160, 120), 85)
    queue = LabelQueue(s3, config.train_bucket, 10)
    with FunctionServer("predict", env, tmp_path / "predict.log") as server:
        for sent in (1, 2):  # one after the other settled: conditional PUTs never race
            reply = put_and_notify(server.url, config, s3, bucket, "day/one.jpg", photo)
            assert reply.status_code == 200, reply.text
            assert from_http(reply.headers, reply.content).data["uncertain"] is True
            outcomes = wait_for(
                lambda n=sent: _settled(server.stats(), n), 20, f"offer {sent} not written"
            )
        assert server.stats()["uncertain"] == 2
    if train_bucket == "missing":
        assert outcomes == {"error": 2}
        assert "could not queue" in (tmp_path / "predict.log").read_text()
        return
    assert outcomes == {"recorded": 1, "duplicate": 1}
    queued = queue.pending()
    assert [(e.path, e.model["version"]) for e in queued] == [(f"{bucket}/day/one.jpg", "v1")]
    assert len(queued[0].top) == 3 and queued[0].etag


@pytest.mark.slow
def test_a_full_backlog_drops_the_offer_and_never_delays_the_answer(
    s3_server, kafka_broker, tiny_models
):
    """A backlog of one: while the writer's write is held, the next uncertain image is
    answered at once and its offer counted busy; the held write lands once let go."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lensflow.function_server import knative_request
    from lensflow.scenes import scene_jpeg
    from lensflow_eventing.contracts import ObjectEvent, notification_record
    from lensflow_predict import metrics
    from lensflow_predict.fetch import ImageFetcher
    from lensflow_predict.handler import PredictHandler
    from lensflow_predict.labels import LabelWriter
    from lensflow_predict.sink import PredictionProducer
    from lensflow_predict.watcher import ModelWatcher

    class HeldQueue(LabelQueue):
        """A labelling queue whose writes wait until the test lets them go."""

        started = threading.Event()
        go = threading.Event()

        def offer_many(self, offers):
            self.started.set()
            self.go.wait(60)
            return super().offer_many(offers)

    _, config, s3 = _uncertain_stack(s3_server, kafka_broker, tiny_models, "same")
    watcher = ModelWatcher(ModelStore.from_config(config, s3=s3), config.pointer_ttl_s, 1)
    watcher.refresh()
    assert watcher.model is not None
    held = HeldQueue(s3, config.train_bucket, 10)
    producer = PredictionProducer(config.kafka, config.topic_predictions)
    writer = LabelWriter(held, backlog=1)
    handler = PredictHandler(config, ImageFetcher(config), watcher, producer, writer)
    bucket = config.image_buckets[0]

    def answer(key: str):
        photo = scene_jpeg("road", len(key), (96, 96))
        etag = s3.put_object(Bucket=bucket, Key=key, Body=photo)["ETag"]
        _, value = notification_record(ObjectEvent("s3:ObjectCreated:Put", bucket, key, etag))
        return handler.handle(*knative_request(config, value))

    before = metrics.counts(metrics.LABEL_QUEUE)
    with ThreadPoolExecutor(1) as requests:
        try:
            first = requests.submit(answer, "held.jpg").result(timeout=30)
            assert held.started.wait(10)  # its write runs, and is held
            second = requests.submit(answer, "dropped.jpg").result(timeout=30)
            assert (first.status, second.status) == (200, 200)
            after = metrics.counts(metrics.LABEL_QUEUE)
            assert after.get("busy", 0) == before.get("busy", 0) + 1
            assert held.size("v1") == 0  # nothing written while held
        finally:
            HeldQueue.go.set()
            producer.close()
    wait_for(lambda: held.size("v1") == 1, 20, "the held write never landed")
    assert [e.key for e in held.pending()] == ["held.jpg"]
    recorded = before.get("recorded", 0) + 1
    wait_for(lambda: metrics.counts(metrics.LABEL_QUEUE).get("recorded") == recorded, 5, "count")


def _uncertain_stack(s3_server, kafka_broker, tiny_models, train_bucket: str):
    """(env, config, s3): buckets, topics and the random model as v1; every prediction
    counts as uncertain."""
    from lensflow_core.s3 import ensure_buckets
    from lensflow_core.settings import Config
    from lensflow_eventing.topics import ensure_topics, topic_specs
    from tests.support.env import make_env

    extra = {"LENSFLOW_TRAIN_BUCKET": "no-such-train-bucket"} if train_bucket == "missing" else {}
    env = make_env(
        s3_server.endpoint, kafka_broker.bootstrap, LENSFLOW_UNCERTAIN_TOP1="1.01", **extra
    )
    config = Config.from_env(env)
    s3 = s3_client(config)
    missing = {"no-such-train-bucket"}
    ensure_buckets(s3, [b for b in config.buckets if b not in missing])
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    store = ModelStore.from_config(config)
    store.flip(store.publish(tiny_models["random"], LABELS).version, reason="test")
    return env, config, s3


def _settled(stats: dict, offers: int) -> dict[str, int] | None:
    """The labelling queue's outcomes in ``/stats`` once ``offers`` of them are counted."""
    outcomes = stats["label_queue"]
    return outcomes if sum(outcomes.values()) == offers else None


def test_every_label_is_a_decision_with_who_and_when_and_a_move_is_not_undone(world):
    from lensflow_model_store.decisions import DecisionLog
    from lensflow_model_store.label_images import LabelConflict, undo

    config, s3, bucket, queue = world
    etag = put(s3, bucket, "d/p.jpg", b"photo")
    queue.offer(bucket, "d/p.jpg", etag, model("v1"), scores(0.4, 0.3, 0.3))
    relabel(world, "forest", [f"{bucket}/d/p.jpg"])
    relabel(world, "water", [f"{bucket}/d/p.jpg"])  # the CLI's relabel: a move
    log = DecisionLog(queue.objects).of(bucket, "d/p.jpg")
    assert [(d.sequence, d.cls, d.by) for d in log] == [
        (1, "forest", "tester"),
        (2, "water", "tester"),
    ]
    assert log[1].replaced == ["labeled/forest/p.jpg"] and log[0].requeue
    with pytest.raises(LabelConflict, match="label it back instead"):
        undo(s3, train_bucket=config.train_bucket, path=f"{bucket}/d/p.jpg", by="x", queue=queue)
    # strict (the dashboard's rule): not on the queue any more, so refused, nothing written
    with pytest.raises(LabelConflict, match="not on the labelling queue"):
        label(
            s3,
            train_bucket=config.train_bucket,
            image_buckets=config.image_buckets,
            known_labels=LABELS,
            cls="field",
            paths=[f"{bucket}/d/p.jpg"],
            queue=queue,
            strict=True,
        )
    assert len(DecisionLog(queue.objects).of(bucket, "d/p.jpg")) == 2
