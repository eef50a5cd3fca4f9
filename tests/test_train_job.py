"""Training as a batch Job: the event file, the model store's lease, the memory bound and
the streamed dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from cloudevents.conversion import to_json
from cloudevents.http import CloudEvent

from lensflow import scenes
from lensflow.seeding import seed_training_data
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_model_store import LeaseHeldError, ModelStore, layout
from lensflow_train import dataset, job
from lensflow_train.evaluate import evaluate_pictures, evaluate_tflite
from lensflow_train.round import run_round
from tests.support.env import LABELS

JOB = [sys.executable, "-m", "lensflow_train.job"]
REPO = Path(__file__).resolve().parents[1]


def ping(data) -> bytes:
    """The event as the JobSink mounts it: structured CloudEvent JSON."""
    event = CloudEvent(
        {
            "type": "dev.knative.sources.ping",
            "source": "/apis/v1/namespaces/lensflow/pingsources/lensflow-train",
            "datacontenttype": "application/json",
        },
        data,
    )
    return to_json(event)


def store_keys(config: Config) -> list[str]:
    s3 = s3_client(config)
    return [o["Key"] for o in s3.list_objects_v2(Bucket=config.model_bucket).get("Contents", [])]


def run_job_process(env: dict[str, str], event: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*JOB, "--event", str(event)],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=240,
        text=True,
    )


def labelled_only(config: Config) -> None:
    s3 = s3_client(config)
    dataset.upload(s3, config.train_bucket, layout.LABELED, scenes.labelled_set(2, 1), "x")


# --- the lease ----------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_two_concurrent_acquirers_exactly_one_wins(config):
    store = ModelStore.from_config(config)
    start = threading.Barrier(6)
    won, refused = [], []

    def acquire(i: int) -> None:
        lease_file = store.lease(60)
        start.wait()
        try:
            won.append(lease_file.acquire(f"round-{i}"))
        except LeaseHeldError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=acquire, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1 and len(refused) == 5
    assert all("another round holds the lease" in r for r in refused)
    held = store.lease(60).read()
    assert held.holder == won[0].holder and held.etag == won[0].etag
    body = json.loads(
        s3_client(config)
        .get_object(Bucket=config.model_bucket, Key="aerial/lock.json")["Body"]
        .read()
    )
    assert {"holder", "acquired_at", "expires_at"} <= body.keys()


def test_an_expired_lease_is_taken_over_and_its_old_holder_releases_nothing(config):
    store = ModelStore.from_config(config)
    clock = Clock()
    first = store.lease(100)
    first.clock = clock
    old = first.acquire("crashed-round")
    clock.now += 99
    second = store.lease(100)
    second.clock = clock
    with pytest.raises(LeaseHeldError, match="held by crashed-round"):
        second.acquire("early")
    clock.now += 2  # now past expires_at
    new = second.acquire("late")
    assert new.holder == "late" and new.etag != old.etag
    assert not first.release(old), "the old holder's release must not delete the new lease"
    assert store.lease(100).read().holder == "late"
    assert second.release(new) and store.lease(100).read() is None
    assert "aerial/lock.json" not in store_keys(config)


def test_of_two_takeovers_of_an_expired_lease_one_wins(config):
    store = ModelStore.from_config(config)
    clock = Clock()
    stale = store.lease(10)
    stale.clock = clock
    stale.acquire("crashed")
    clock.now += 11
    a, b = store.lease(10), store.lease(10)
    a.clock = b.clock = clock
    expired = b.read()
    a.acquire("a")
    b.read = lambda: expired  # b read the expired lease just before a took it over
    with pytest.raises(LeaseHeldError, match="took over the expired one first"):
        b.acquire("b")
    assert store.lease(10).read().holder == "a"


# --- the Job's entry point ----------------------------------------------------------------


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "no event at"),
        (b"", "not a CloudEvent"),
        (b"not json at all", "not a CloudEvent"),
        (b'{"reason": "schedule"}', "not a CloudEvent"),
        (ping(["schedule"]), "must be a JSON object"),
        (ping({"reason": "schedule", "epochs": 3}), "unknown field(s) epochs"),
        (ping({}), '"reason"'),
        (ping({"reason": "manual", "force": "yes"}), '"force"'),
    ],
)
def test_a_bad_or_missing_event_is_refused_and_changes_nothing(env, tmp_path, content, why, capsys):
    config = Config.from_env(env)
    labelled_only(config)
    event = tmp_path / "event"
    if content is not None:
        event.write_bytes(content)
    assert job.main(["--event", str(event)]) == job.EXIT_BAD_EVENT
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and why in err, err
    assert store_keys(config) == []


def test_a_jobsink_event_runs_one_round_and_exits_0_with_its_report(env, tmp_path):
    config = Config.from_env(env)
    labelled_only(config)  # no holdout: the round is refused, and says so
    (tmp_path / "event").write_bytes(ping({"reason": "schedule"}))
    done = run_job_process(env, tmp_path / "event")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["outcome"] == "skipped" and "no holdout" in report["reason"]
    assert report["trigger"]["reason"] == "schedule"
    assert report["trigger"]["type"] == "dev.knative.sources.ping"
    assert "no holdout" in done.stderr  # the reason is in the log too
    # lease released; nothing written but the round's report, with its decision
    (kept,) = store_keys(config)
    assert kept.startswith(f"{config.model_name}/rounds/") and report["round_id"] in kept
    assert report["decision"] == "refused: no data"


def test_a_round_while_the_lease_is_held_is_refused_and_changes_nothing(env, tmp_path):
    config = Config.from_env({**env, "LENSFLOW_TRAIN_MIN_NEW": "1"})
    seed_training_data(config, 3, 2, seed=1)  # a round would train
    store = ModelStore.from_config(config)
    other = store.lease(config.train_lease_ttl_s).acquire("another-job")
    (tmp_path / "event").write_bytes(ping({"reason": "manual", "force": True}))
    done = run_job_process(env, tmp_path / "event")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["outcome"] == "skipped"
    assert report["reason"].startswith("another round holds the lease")
    assert report["decision"] == "refused: another round running"
    assert "another-job" in report["reason"] and "another round holds the lease" in done.stderr
    assert store.list_versions() == [] and store.current() is None
    assert store.lease(1).read().etag == other.etag  # still theirs


def test_an_unreachable_store_fails_the_job(env, tmp_path):
    (tmp_path / "event").write_bytes(ping({"reason": "schedule"}))
    done = run_job_process(
        {**env, "LENSFLOW_S3_ENDPOINT": "http://127.0.0.1:1"}, tmp_path / "event"
    )
    assert done.returncode == job.EXIT_FAILED
    report = json.loads(done.stdout)
    assert report["outcome"] == "failed" and "training lease" in report["reason"]
    assert report["decision"] == "failed"


def test_bind_threads_takes_the_manifest_variables_first(monkeypatch):
    for name in job.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(job, "usable_cpus", lambda: 5)
    assert job.bind_threads() == 5  # none set: the CPUs the process may use
    assert all(os.environ[name] == "5" for name in job.THREAD_VARIABLES)
    for name in job.THREAD_VARIABLES:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the manifest's limits.cpu wins
    assert job.bind_threads() == 3
    assert all(os.environ[name] == "3" for name in job.THREAD_VARIABLES)


# --- memory: streaming and the bound -------------------------------------------------------


def test_a_round_over_the_image_limit_is_refused_before_loading(env):
    total = 4 * len(scenes.CLASSES)  # 3 labelled and 1 holdout image per class
    config = Config.from_env({**env, "LENSFLOW_TRAIN_MAX_IMAGES": str(total - 1)})
    seed_training_data(config, 3, 1, seed=2)
    report = run_round(config, force=True)
    assert report.outcome == "skipped"
    assert (
        f"{total} labelled and holdout images, over LENSFLOW_TRAIN_MAX_IMAGES ({total - 1})"
        in report.reason
    )
    assert "load_s" not in report.timings  # nothing was fetched
    assert ModelStore.from_config(config).list_versions() == []


def test_load_decodes_once_into_uint8_arrays_and_drops_what_does_not_decode(config):
    s3 = s3_client(config)
    bucket = config.train_bucket
    dataset.upload(s3, bucket, layout.HOLDOUT, scenes.labelled_set(2, 7), "h")
    s3.put_object(Bucket=bucket, Key="holdout/field/broken.jpg", Body=b"\xff\xd8 not a jpeg")
    s3.put_object(Bucket=bucket, Key="holdout/water/huge.jpg", Body=b"\xff\xd8" * 60_000)
    split = dataset.list_split(s3, bucket, layout.HOLDOUT)
    pictures = dataset.load(
        s3,
        bucket,
        split,
        [(32, 32), (96, 96)],
        max_pixels=config.max_image_pixels,
        max_bytes=100_000,
    )
    assert sorted(pictures.undecodable) == ["holdout/field/broken.jpg", "holdout/water/huge.jpg"]
    assert len(pictures) == len(split) - 2 == 2 * len(scenes.CLASSES)
    assert pictures.classes == [
        c for c, k in zip(split.classes, split.keys, strict=True) if k not in pictures.undecodable
    ]
    assert pictures.arrays[(32, 32)].shape == (len(pictures), 32, 32, 3)
    assert pictures.arrays[(96, 96)].dtype == np.uint8


def test_holdout_arrays_score_exactly_as_the_encoded_images_do(config, tiny_models):
    """The holdout decoded once gives each model the same pixels the predict function would."""
    s3 = s3_client(config)
    bucket = config.train_bucket
    items = [(LABELS[i % 3], scenes.scene_jpeg(LABELS[i % 3], i, (300, 200))) for i in range(12)]
    dataset.upload(s3, bucket, layout.HOLDOUT, items, "h")
    split = dataset.list_split(s3, bucket, layout.HOLDOUT)
    pictures = dataset.load(
        s3, bucket, split, [(32, 32)], config.max_image_pixels, config.max_image_bytes
    )
    blobs = [s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in split.keys]
    for model in tiny_models.values():
        from_arrays = evaluate_pictures(model, LABELS, pictures.arrays[(32, 32)], pictures.classes)
        from_blobs = evaluate_tflite(model, LABELS, blobs, split.classes)
        assert from_arrays.confusion == from_blobs.confusion


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_lease_outlasts_the_jobs_deadline_and_the_image_bound_fits_its_memory(overlay):
    """The lease must not expire under a running Job; LENSFLOW_TRAIN_MAX_IMAGES must fit the
    Job's memory limit by the last measurement (bench/results/train_memory.json)."""
    from bench.train_memory_bench import HEADROOM
    from tests.support.knative_manifests import build, config_map, one, pod_spec

    docs = build(overlay)
    values = config_map(docs)["data"]
    jobsink = one(docs, "JobSink", "lensflow-train")
    deadline = jobsink["spec"]["job"]["spec"]["activeDeadlineSeconds"]
    assert float(values["LENSFLOW_TRAIN_LEASE_TTL_S"]) >= deadline
    (container,) = pod_spec(jobsink)["containers"]
    memory = container["resources"]["limits"]["memory"]
    assert memory.endswith("Gi")
    limit_mb = float(memory[:-2]) * 1024
    measured = json.loads((REPO / "bench" / "results" / "train_memory.json").read_text())
    for backbone in ("none", "mobilenet_v2_imagenet"):  # LENSFLOW_TRAIN_BACKBONE
        figures = measured[backbone]
        need_mb = (
            figures["base_mb"]
            + figures["worst_load_buffers_mb"]
            + int(values["LENSFLOW_TRAIN_MAX_IMAGES"]) * figures["per_image_kb"] / 1024
        )
        assert need_mb <= HEADROOM * limit_mb, f"{backbone}: {need_mb:.0f} MB for a {memory} Job"
