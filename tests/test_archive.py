"""The predictions archive: exactly once into Parquet, bad records set aside, read back."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import date, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cloudevents.kafka import to_binary

from lensflow_archive.archiver import Archiver
from lensflow_archive.compact import compact_day, first_of_each_upload
from lensflow_archive.query import query
from lensflow_archive.records import SCHEMA, Rejected, to_row
from lensflow_archive.store import (
    PREDICTIONS,
    ArchiveFile,
    ArchiveStore,
    ArchiveUnwritable,
    current,
    file_key,
    parquet_bytes,
)
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config
from lensflow_eventing.offsets import committed_offsets
from lensflow_eventing.topics import ensure_topics, topic_specs
from tests.support.archive_support import archived, doubled, keys, make_prediction, produce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Record:
    """A consumed record, as confluent-kafka hands it over."""

    def __init__(self, value, headers=None, offset=0, key=b"k"):
        self._value, self._headers, self._offset, self._key = value, headers, offset, key

    def value(self):
        return self._value

    def headers(self):
        return self._headers

    def key(self):
        return self._key

    def topic(self):
        return "predictions"

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def timestamp(self):
        return (1, 1_780_000_000_000)


def as_record(event) -> Record:
    message = to_binary(event)
    return Record(message.value, list(message.headers.items()))


def test_a_prediction_event_becomes_one_complete_row():
    row = to_row(as_record(make_prediction(5)))
    assert row["bucket"] == "drone-images" and row["key"] == "fleet/drone-02/000005.jpg"
    assert (row["label"], row["score"]) == ("truck", 0.8)
    assert [t["label"] for t in row["top"]] == ["truck", "other"]
    assert row["model_version"] == "v1" and len(row["trace_id"]) == 32
    assert row["source_event_id"] == "partition:0/offset:5"
    assert row["latency_ms"] is not None and row["uploaded_at"].year == 2026


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (Record(b"not json at all"), "not a CloudEvent"),
        (
            Record(
                b"{}",
                [
                    ("ce_specversion", b"1.0"),
                    ("ce_id", b"x"),
                    ("ce_source", b"/s"),
                    ("ce_type", b"io.example.other"),
                ],
            ),
            "type is 'io.example.other'",
        ),
        (
            Record(
                b'{"image": {"bucket": "b"}, "model": {}, "predictions": []}',
                [
                    ("ce_specversion", b"1.0"),
                    ("ce_id", b"x"),
                    ("ce_source", b"/s"),
                    ("ce_type", b"io.lensflow.image.predicted"),
                    ("ce_time", b"2026-12-01T00:00:00Z"),
                ],
            ),
            "data.predictions is missing or empty",
        ),
        (
            Record(
                b'{"image": {"bucket": "b"}, "model": {"name": "m", "version": "1", "sha256": "s"},'
                b' "predictions": [{"label": "car", "score": 0.9}], "source_event_id": "e"}',
                [
                    ("ce_specversion", b"1.0"),
                    ("ce_id", b"x"),
                    ("ce_source", b"/s"),
                    ("ce_type", b"io.lensflow.image.predicted"),
                    ("ce_time", b"2026-12-01T00:00:00Z"),
                ],
            ),
            "data.image.key is missing",
        ),
        (
            Record(
                b"\xff\xfe not utf8",
                [
                    ("ce_specversion", b"1.0"),
                    ("ce_id", b"x"),
                    ("ce_source", b"/s"),
                    ("ce_type", b"io.lensflow.image.predicted"),
                ],
            ),
            "data is not JSON",
        ),
    ],
)
def test_what_is_not_a_prediction_event_is_rejected_with_its_reason(record, reason):
    with pytest.raises(Rejected, match=reason.replace("(", r"\(")):
        to_row(record)


def test_readers_skip_files_that_a_compaction_covers():
    small = [ArchiveFile(f"p/date=d/t+0+{a}-{b}", "t", 0, a, b) for a, b in ((0, 4), (5, 9))]
    merged = ArchiveFile("p/date=d/t+0+0-9", "t", 0, 0, 9)
    other = ArchiveFile("p/date=d/t+1+0-4", "t", 1, 0, 4)
    assert current([*small, merged, other]) == [merged, other]
    assert current(small) == small


# --- against real servers ------------------------------------------------------------------


@pytest.fixture
def archive_config(kafka_env) -> Config:
    env = {**kafka_env, "LENSFLOW_ARCHIVE_BUCKET": kafka_env["LENSFLOW_MODEL_BUCKET"] + "-arch"}
    config = Config.from_env(env)
    ensure_buckets(s3_client(config), [config.archive_bucket])
    ensure_topics(config.kafka, topic_specs(*config.topics))
    return config


def drain(config: Config, **overrides) -> dict:
    return Archiver(config, **overrides).run(follow=False)


BAD_RECORDS = [
    (b"k1", b"not json", []),
    (
        b"k2",
        b"{}",
        [
            ("ce_specversion", b"1.0"),
            ("ce_id", b"a"),
            ("ce_source", b"/x"),
            ("ce_type", b"io.example.other"),
        ],
    ),
    (
        b"k3",
        b'{"image": {}}',
        [
            ("ce_specversion", b"1.0"),
            ("ce_id", b"b"),
            ("ce_source", b"/x"),
            ("ce_type", b"io.lensflow.image.predicted"),
            ("ce_time", b"2026-12-01T00:00:00Z"),
        ],
    ),
]


@pytest.mark.slow
def test_drain_archives_each_event_once_and_sets_bad_records_aside(archive_config):
    config = archive_config
    days = [(date.today() - timedelta(days=n)).isoformat() for n in (2, 0)]
    ids = produce(config, [make_prediction(i, day=days[i % 2]) for i in range(60)], BAD_RECORDS)
    report = drain(config, batch_max=25)
    assert (report["archived"], report["rejected"]) == (60, 3)
    table = archived(config)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    assert {f"date={d}" for d in days} <= {k.split("/")[1] for k in keys(config, "predictions/")}
    lines = [
        json.loads(line)
        for key in keys(config, "rejects/")
        for line in s3_client(config)
        .get_object(Bucket=config.archive_bucket, Key=key)["Body"]
        .read()
        .splitlines()
    ]
    assert sorted(line["reason"].split(":")[0] for line in lines) == [
        "data.predictions is missing or empty",
        "not a CloudEvent (no ce_specversion header, not structured mode)",
        "type is 'io.example.other', not io.lensflow.image.predicted",
    ]
    assert drain(config)["archived"] == 0  # committed: nothing archived twice
    assert (
        sum(
            committed_offsets(config.kafka, config.topic_predictions, config.archive_group).values()
        )
        == 63
    )


@pytest.mark.slow
def test_a_replay_with_other_batch_boundaries_replaces_the_unfinished_files(
    archive_config, monkeypatch
):
    """Files written, offsets not committed (a crash between the two): the next run, cutting
    its batches elsewhere, leaves every event once and no file overlapping another."""
    config = archive_config
    ids = produce(config, [make_prediction(i) for i in range(40)])
    from confluent_kafka import Consumer

    class Killed(Consumer):
        def commit(self, *args, **kwargs):
            raise RuntimeError("killed between the write and the commit")

    monkeypatch.setattr(Archiver, "_make_consumer", lambda self: Killed(self.settings()))
    with pytest.raises(RuntimeError, match="killed"):
        drain(config, batch_max=7)
    monkeypatch.undo()
    written = keys(config, "predictions/")
    assert written  # the orphans are there
    drain(config, batch_max=1000)
    table = archived(config)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    assert not doubled(table.column("id").to_pylist())
    files = ArchiveStore(s3_client(config), config.archive_bucket).list("predictions/")
    for f in files:
        assert not any(
            g is not f and g.partition == f.partition and g.first <= f.last and f.first <= g.last
            for g in files
        )


@pytest.mark.slow
def test_an_unwritable_archive_bucket_stops_the_archiver_and_commits_nothing(archive_config):
    config = archive_config
    produce(config, [make_prediction(i) for i in range(10)])
    missing = Config.from_env({**config.env, "LENSFLOW_ARCHIVE_BUCKET": "no-such-archive-bucket"})
    with pytest.raises(ArchiveUnwritable, match="no-such-archive-bucket.*cannot be"):
        drain(missing)
    assert committed_offsets(config.kafka, config.topic_predictions, config.archive_group) == {}
    assert drain(config)["archived"] == 10  # nothing was lost


@pytest.mark.slow
def test_the_job_exits_non_zero_with_the_reason_when_the_bucket_cannot_be_written(archive_config):
    config = archive_config
    produce(config, [make_prediction(1)])
    env = {**os.environ, **config.env, "LENSFLOW_ARCHIVE_BUCKET": "no-such-archive-bucket"}
    out = subprocess.run(
        [sys.executable, "-m", "lensflow_archive.job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 1
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "no-such-archive-bucket" in report["error"] and report["archived"] == 0


@pytest.mark.slow
def test_compaction_merges_a_closed_days_files_without_loss_or_doubles(archive_config):
    config = archive_config
    day = (date.today() - timedelta(days=3)).isoformat()
    ids = produce(config, [make_prediction(i, day=day) for i in range(45)])
    drain(config, batch_max=6)
    store = ArchiveStore(s3_client(config), config.archive_bucket)
    before = store.list(f"predictions/date={day}/")
    assert len(before) > 3
    committed = committed_offsets(config.kafka, config.topic_predictions, config.archive_group)
    # A compaction stopped after writing its merged file: readers skip the covered ones.
    partition = before[0].partition
    mine = [f for f in before if f.partition == partition]
    whole = pa.concat_tables(pq.read_table(io.BytesIO(store.get(f.key))) for f in mine)
    store.put(
        file_key(
            PREDICTIONS, day, config.topic_predictions, partition, mine[0].first, mine[-1].last
        ),
        parquet_bytes(whole),
    )
    assert not doubled(r["id"] for r in query(config, "select id from predictions").records())
    compact_day(store, day, config.topic_predictions, committed)
    after = store.list(f"predictions/date={day}/")
    assert len(after) == len({f.partition for f in before})
    table = archived(config)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)


@pytest.mark.slow
def test_a_second_prediction_of_one_upload_is_left_out_in_a_batch_and_after_a_restart(
    archive_config,
):
    """An image event delivered twice within the at-least-once window (its commit lost
    with the dispatcher's group session: soak seed 4242), or a notification sent twice
    (the broker's answer lost: seed 5151), is predicted twice, with two event ids; the
    archive keeps the first."""
    config = archive_config
    first = produce(config, [make_prediction(i) for i in range(20)])
    notified_again = make_prediction(7)  # the notification sent twice (seed 5151)
    notified_again.data["source_event_id"] = "partition:3/offset:359"
    produce(config, [make_prediction(3), make_prediction(3), notified_again])  # one batch
    report = drain(config)
    assert (report["archived"], report["duplicates_left_out"]) == (20, 3)
    # the archiver restarted: what it archived is read back from the committed files
    later = produce(config, [make_prediction(5), make_prediction(20)])
    report = drain(config)
    assert (report["archived"], report["duplicates_left_out"]) == (1, 1)
    table = archived(config)
    assert sorted(table.column("id").to_pylist()) == sorted([*first, later[1]])


def test_compaction_keeps_the_first_prediction_of_each_upload():
    rows = [to_row(as_record(make_prediction(i))) for i in (0, 1, 0, 2, 1)]
    for offset, row in enumerate(rows):
        row["offset"] = offset
    table = pa.Table.from_pylist(rows, SCHEMA)
    kept = first_of_each_upload(table)
    assert kept.column("offset").to_pylist() == [0, 1, 3]
    assert first_of_each_upload(kept) is kept  # nothing to leave out: the same table


@pytest.mark.slow
def test_kill_9_at_random_moments_during_a_burst_loses_and_doubles_nothing(archive_config):
    config = archive_config
    env = {
        **os.environ,
        **config.env,
        "LENSFLOW_ARCHIVE_BATCH": "15",
        "LENSFLOW_ARCHIVE_FLUSH_S": "0.1",
    }
    sent: list[str] = []

    def fly() -> None:  # 600 events over about 15 s
        for k in range(0, 600, 20):
            sent.extend(produce(config, [make_prediction(i) for i in range(k, k + 20)]))
            time.sleep(0.5)

    burst = threading.Thread(target=fly)
    burst.start()
    rng = random.Random(19)
    kills = 0
    while burst.is_alive() or kills < 4:
        child = subprocess.Popen(
            [sys.executable, "-m", "lensflow_archive.job", "--follow"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # long enough to join the group (the dead member's session, 6 s, must expire first)
        # and archive some, killed anywhere: holding records, writing, or committing
        time.sleep(rng.uniform(4.0, 10.0))
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        kills += 1
    burst.join()
    done = committed_offsets(config.kafka, config.topic_predictions, config.archive_group)
    assert 0 < sum(done.values()) < len(sent), "the killed archivers had done part of it"
    report = drain(config)
    table = archived(config)
    got = table.column("id").to_pylist()
    assert not doubled(got), f"doubled after {kills} kills"
    assert sorted(got) == sorted(sent), f"missing {len(set(sent) - set(got))} after {kills} kills"
    assert report["rejected"] == 0


# --- asking the archive -------------------------------------------------------------------


def lensflow(config: Config, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **config.env}
    return subprocess.run(
        [sys.executable, "-m", "lensflow", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.fixture
def filled(archive_config) -> Config:
    day = (date.today() - timedelta(days=1)).isoformat()
    events = [make_prediction(i, day=day, version="v2" if i >= 30 else "v1") for i in range(40)]
    produce(archive_config, events)
    drain(archive_config, batch_max=9)
    return archive_config


@pytest.mark.slow
def test_query_and_named_questions_answer_from_the_archive(filled):
    out = lensflow(
        filled,
        "predictions",
        "query",
        "--json",
        "select count(*) as n, count(distinct id) as ids from predictions",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"n": 40, "ids": 40}]
    csv_out = lensflow(filled, "predictions", "report", "per-class-per-day", "--csv")
    assert csv_out.returncode == 0, csv_out.stderr
    lines = csv_out.stdout.splitlines()
    assert lines[0] == "date,label,predictions" and len(lines) == 5
    assert sum(int(line.rsplit(",", 1)[1]) for line in lines[1:]) == 40
    versions = json.loads(
        lensflow(filled, "predictions", "report", "low-confidence-by-version", "--json").stdout
    )
    assert [(v["model_version"], v["predictions"]) for v in versions] == [("v1", 30), ("v2", 10)]
    # scores are 0.3 .. 0.9 by i % 7: under 0.6 for i % 7 in (0, 1, 2)
    assert versions[0]["low_confidence"] == sum(1 for i in range(30) if i % 7 < 3)
    drones = json.loads(
        lensflow(filled, "predictions", "report", "per-drone-per-hour", "--json").stdout
    )
    assert {d["drone"]: d["predictions"] for d in drones} == {
        "fleet/drone-00": 14,
        "fleet/drone-01": 13,
        "fleet/drone-02": 13,
    }
    text = lensflow(filled, "predictions", "report", "latency-by-day")
    assert text.returncode == 0 and "p95_ms" in text.stdout and "(1 row)" in text.stdout


BAD_QUERIES = [
    ("delete from predictions", "read-only: only queries run, not DELETE"),
    ("drop view predictions", "read-only: only queries run, not DROP"),
    (
        "copy (select * from predictions) to '/tmp/out.csv'",
        "read-only: only queries run, not COPY",
    ),
    ("select 1; delete from predictions", "exactly one query, not 2 statements"),
    ("selec count(*) from predictions", "Parser Error"),
    ("select no_such_column from predictions", 'column "no_such_column" not found'),
    ("select * from read_csv('/etc/passwd')", "Permission Error"),
]


@pytest.mark.slow
def test_a_query_cannot_change_the_archive_and_bad_sql_is_one_line(filled):
    for sql, reason in BAD_QUERIES:
        out = lensflow(filled, "predictions", "query", sql)
        assert out.returncode == 1, sql
        assert out.stdout == ""
        assert len(out.stderr.strip().splitlines()) == 1 and reason in out.stderr, out.stderr
    out = lensflow(
        filled, "predictions", "query", "--json", "select count(*) as n from predictions"
    )
    assert json.loads(out.stdout) == [{"n": 40}]
    nowhere = Config.from_env({**filled.env, "LENSFLOW_ARCHIVE_BUCKET": "no-such-archive"})
    out = lensflow(nowhere, "predictions", "report", "per-class-per-day")
    assert out.returncode == 1 and "'no-such-archive' does not exist" in out.stderr


@pytest.mark.slow
def test_the_dashboards_history_comes_from_the_archive_and_survives_a_restart(filled):
    from starlette.testclient import TestClient

    from lensflow.dashboard import DashboardState, make_app

    answers = []
    for _ in range(2):  # a restarted dashboard reads the same history
        with TestClient(make_app(DashboardState(filled))) as client:
            reply = client.get("/api/history", params={"sql": "delete from predictions"})
            assert reply.status_code == 200
            answers.append(reply.json())
            assert client.get("/history.js").status_code == 200
    history = answers[0]
    assert history["error"] is None and answers[0] == answers[1]
    assert sum(r["predictions"] for r in history["per_class_per_day"]) == 40
    assert [(v["model_version"], v["predictions"]) for v in history["per_version"]] == [
        ("v1", 30),
        ("v2", 10),
    ]


@pytest.mark.slow
def test_the_archive_reads_with_plain_parquet_readers_as_the_docs_show(filled, tmp_path):
    """docs/archive.md: pyarrow over S3 with hive partitioning; DuckDB read_parquet on a copy."""
    import duckdb
    import pyarrow.dataset as ds
    from pyarrow import fs

    host = filled.s3_endpoint.split("://", 1)[1]
    s3fs = fs.S3FileSystem(
        access_key=filled.s3_access_key,
        secret_key=filled.s3_secret_key,
        endpoint_override=host,
        scheme="http",
        region=filled.s3_region,
    )
    table = ds.dataset(
        f"{filled.archive_bucket}/predictions",
        filesystem=s3fs,
        format="parquet",
        partitioning="hive",
    ).to_table(filter=ds.field("label") == "car")
    assert table.num_rows == 10  # i % 4 == 0 of 40
    s3 = s3_client(filled)
    for key in keys(filled, "predictions/"):
        target = tmp_path / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.get_object(Bucket=filled.archive_bucket, Key=key)["Body"].read())
    rows = duckdb.sql(
        f"SELECT date, label, count(*) FROM read_parquet('{tmp_path}/predictions/*/*.parquet', "
        "hive_partitioning = true) GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert sum(n for _, _, n in rows) == 40 and len(rows) == 4


@pytest.mark.slow
def test_a_run_compacts_the_closed_days_and_compact_is_then_a_no_op(filled):
    store = ArchiveStore(s3_client(filled), filled.archive_bucket)
    assert len(store.list("predictions/")) > 3  # the fixture's batches of 9, yesterday
    again = lensflow(filled, "archive", "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["archived"] == 0  # all committed already
    assert sum(d["merged"] for d in report["compacted"]) > 3  # yesterday is closed
    assert len(store.list("predictions/")) == 3  # one file per partition of the one date
    out = lensflow(filled, "archive", "compact", "--json")
    assert out.returncode == 0, out.stderr
    assert sum(d["merged"] for d in json.loads(out.stdout)) == 0
    counted = lensflow(
        filled, "predictions", "query", "--json", "select count(distinct id) as n from predictions"
    )
    assert json.loads(counted.stdout) == [{"n": 40}]


@pytest.mark.slow
def test_the_stacks_archiver_stops_on_an_unwritable_bucket_and_is_started_again(
    s3_server, kafka_broker, tmp_path
):
    from lensflow.stack import EmbeddedStack
    from tests.support.env import make_env

    env = make_env(s3_server.endpoint, kafka_broker.bootstrap, LENSFLOW_ARCHIVE_FLUSH_S="0.2")
    env["LENSFLOW_ARCHIVE_BUCKET"] = env["LENSFLOW_MODEL_BUCKET"] + "-arch"
    stack = EmbeddedStack(env, log_dir=tmp_path, dispatch=False, external={"kafka", "s3"})
    with stack:
        config, s3 = stack.config, s3_client(stack.config)
        s3.delete_bucket(Bucket=config.archive_bucket)  # made by the stack; now gone
        ids = produce(config, [make_prediction(i) for i in range(30)])
        deadline = time.monotonic() + 60
        while stack.archive_stats()["restarts"] == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert stack.archive_stats()["restarts"] >= 1
        log = (tmp_path / "archive.log").read_text()
        assert (
            f"archive bucket {config.archive_bucket!r} cannot be" in log and "NoSuchBucket" in log
        )
        ensure_buckets(s3, [config.archive_bucket])
        while len(archived(config)) < 30 and time.monotonic() < deadline + 30:
            time.sleep(0.5)
        got = archived(config).column("id").to_pylist()
    assert sorted(got) == sorted(ids)


@pytest.mark.slow
def test_the_dashboard_page_shows_the_archives_history(filled):
    from lensflow.dashboard import DashboardServer
    from lensflow.process import free_port
    from tests.support.browser import Browser

    dashboard = DashboardServer(filled, port=free_port()).start()
    try:
        with Browser() as browser:
            browser.goto(dashboard.url)
            browser.wait_for("document.querySelectorAll('#version-history tr').length == 2")
            cells = browser.evaluate(
                "[...document.querySelectorAll('#class-days tr td')].map(e => e.textContent)"
            )
            heads = browser.evaluate(
                "[...document.querySelectorAll('#class-days-head th')].map(e => e.textContent)"
            )
            versions = browser.evaluate(
                "[...document.querySelectorAll('#version-history tr td:first-child')]"
                ".map(e => e.textContent)"
            )
    finally:
        dashboard.stop()
    assert heads == ["date", "boat", "car", "person", "truck"]
    assert cells[0] == (date.today() - timedelta(days=1)).isoformat()
    assert sum(int(c) for c in cells[1:]) == 40
    assert versions == ["v1", "v2"]


@pytest.mark.parametrize(
    "sql",
    [
        "insert into predictions values (1)",
        "update predictions set label = 'x'",
        "create table t as select * from predictions",
        "attach ':memory:' as other",
        "set enable_external_access = true",
        "pragma version",
        "",
    ],
)
def test_only_one_select_runs_over_the_view_and_every_refusal_is_one_line(sql):
    """In process, without a store: the view refuses every statement that is not one query
    and stays as it was (``lensflow_archive.query.run_sql``)."""
    import pyarrow.dataset as ds

    from lensflow_archive.query import QueryError, connect, run_sql

    con = connect(ds.dataset(pa.table({"id": ["a", "b"], "label": ["water", "road"]})))
    with pytest.raises(QueryError) as refused:
        run_sql(con, sql)
    assert "\n" not in str(refused.value) and str(refused.value)
    assert run_sql(con, "select count(*), min(label) from predictions").rows == [(2, "road")]
