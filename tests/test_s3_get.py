"""The predict hot path's S3 requests (libcurl, SigV4 as MinIO's signer signs) against a real S3 API."""

from __future__ import annotations

import threading

import pytest

from lensflow.process import free_port
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.s3_get import ObjectGetter, ObjectTooLarge, Unreachable
from lensflow_core.settings import Config
from lensflow_model_store import (
    ModelStore,
    NotFoundError,
    Pointer,
    PointerFile,
    StoreUnavailableError,
)
from lensflow_predict.curl_objects import CurlObjects
from tests.support.env import make_env


@pytest.fixture
def store(s3_server):
    config = Config.from_env(make_env(s3_server.endpoint))
    s3 = s3_client(config)
    ensure_buckets(s3, config.image_buckets)
    return config, s3, config.image_buckets[0]


@pytest.mark.parametrize("key", ["a.jpg", "drone 7/ü+x=1&(2)~.jpg", "deep/er/%41.jpg"])
def test_any_key_is_signed_and_read_with_its_etag(store, key):
    config, s3, bucket = store
    etag = s3.put_object(Bucket=bucket, Key=key, Body=b"photo bytes")["ETag"].strip('"')
    got = ObjectGetter(config).get(bucket, key, limit=100)
    assert (got.status, got.body, got.etag) == (200, b"photo bytes", etag)


def test_missing_objects_and_wrong_credentials_are_s3_errors(store):
    config, s3, bucket = store
    missing = ObjectGetter(config).get(bucket, "nope.jpg", limit=100)
    assert (missing.status, missing.error_code) == (404, "NoSuchKey")
    no_bucket = ObjectGetter(config).get("no-such-bucket-x", "a.jpg", limit=100)
    assert no_bucket.error_code == "NoSuchBucket"


def test_an_object_over_the_limit_is_refused(store):
    config, s3, bucket = store
    s3.put_object(Bucket=bucket, Key="big.jpg", Body=b"x" * 5000)
    getter = ObjectGetter(config)
    with pytest.raises(ObjectTooLarge):
        getter.get(bucket, "big.jpg", limit=4999)
    assert getter.get(bucket, "big.jpg", limit=5000).body == b"x" * 5000  # handle still good


def test_no_store_is_unreachable(store):
    config, _, bucket = store
    nobody = Config.from_env(
        {**config.env, "LENSFLOW_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    )
    with pytest.raises(Unreachable, match="unreachable"):
        ObjectGetter(nobody, timeout_s=2).get(bucket, "a.jpg", limit=100)


def test_threads_each_read_their_own_objects(store):
    config, s3, bucket = store
    for i in range(8):
        s3.put_object(Bucket=bucket, Key=f"t/{i}.jpg", Body=bytes([i]) * (1000 + i))
    getter, seen, errors = ObjectGetter(config), {}, []

    def read(i: int) -> None:
        try:
            for _ in range(5):
                seen[i] = getter.get(bucket, f"t/{i}.jpg", limit=10_000).body
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert seen == {i: bytes([i]) * (1000 + i) for i in range(8)}


def test_a_conditional_put_writes_once_and_a_list_sees_every_key(store):
    """The labelling queue's writes: If-None-Match ``*`` through the same signer; a LIST
    that pages past 1000 keys and reads escaped names."""
    config, s3, bucket = store
    getter = ObjectGetter(config)
    key = "to-label/v1/ä b&c.json"
    assert getter.put_if_absent(bucket, key, b'{"n": 1}').status == 200
    again = getter.put_if_absent(bucket, key, b'{"n": 2}')
    assert again.status in (409, 412)  # 412 from S3 and MinIO; 409 for a concurrent write
    stored = s3.get_object(Bucket=bucket, Key=key)
    assert stored["Body"].read() == b'{"n": 1}' and stored["ContentType"] == "application/json"
    for i in range(1003):
        s3.put_object(Bucket=bucket, Key=f"many/{i:04d}", Body=b"")
    assert getter.list_keys(bucket, "to-label/v1/") == [key]
    assert getter.list_keys(bucket, "many/") == [f"many/{i:04d}" for i in range(1003)]
    assert getter.list_keys(bucket, "none/") == []
    with pytest.raises(OSError, match="NoSuchBucket"):
        getter.list_keys("no-such-bucket-x", "a/")


def test_a_batch_of_conditional_puts_answers_each_in_order(store):
    """The labelling queue's batch: more records than go in flight at once, one of them
    there already; each answered as alone, in order. No store: each item unreachable."""
    from lensflow_core.s3_get import PARALLEL

    config, s3, bucket = store
    getter = ObjectGetter(config)
    s3.put_object(Bucket=bucket, Key="batch/5.json", Body=b"first")
    items = [(f"batch/{i}.json", b'{"n": %d}' % i) for i in range(PARALLEL + 4)]
    items[7] = ("batch/ä b&7.json", b'{"n": 7}')
    answers = getter.put_many_if_absent(bucket, items, "application/json")
    assert [a.status for a in answers[:5]] == [200] * 5 and answers[5].status in (409, 412)
    assert all(a.status == 200 and a.etag for a in answers[6:])
    for key, body in items:
        want = b"first" if key == "batch/5.json" else body
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == want
    again = getter.put_many_if_absent(bucket, items[:3], "application/json")
    assert [a.status in (409, 412) for a in again] == [True] * 3
    nobody = Config.from_env(
        {**config.env, "LENSFLOW_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    )
    away = ObjectGetter(nobody, timeout_s=2).put_many_if_absent(bucket, items[:2], "text/plain")
    assert [type(a) for a in away] == [Unreachable, Unreachable]


@pytest.mark.parametrize(
    ("method", "path", "extra"),
    [
        ("GET", "drone-images/drone%207/%C3%BC%2Bx%3D1%26%282%29~.jpg", {}),
        (
            "PUT",
            "train/to-label/3/ab.json",
            {"Content-Type": "application/json", "If-None-Match": "*"},
        ),
        ("GET", "train?list-type=2&prefix=to-label%2F3%2F&continuation-token=x%3D", {}),
    ],
)
@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "https://s3.example:443/base"])
def test_the_kept_signing_key_signs_as_minio_signs(method, path, extra, endpoint):
    from datetime import datetime, timezone
    from urllib.parse import urlsplit

    from minio.signer import sign_v4_s3

    config = Config.from_env(make_env(endpoint))
    getter = ObjectGetter(config)
    getter._signed(method, path, "ab" * 32, extra)  # the second signature uses the kept key
    ours = dict(line.split(": ", 1) for line in getter._signed(method, path, "ab" * 32, extra))
    date = datetime.strptime(ours["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    headers = {"Host": getter.host, "x-amz-content-sha256": "ab" * 32}
    headers |= {"x-amz-date": ours["x-amz-date"], **extra}
    minio = sign_v4_s3(
        method=method,
        url=urlsplit(f"{getter.base}/{path}"),
        region=config.s3_region,
        headers=headers,
        credentials=getter.credentials,
        content_sha256="ab" * 32,
        date=date,
    )
    assert ours["authorization"] == minio["Authorization"]


def test_the_pointer_is_read_through_libcurl_with_a_conditional_get(store):
    """The replica's watcher asks for the pointer twice a TTL (through boto3 that cost it
    ~4% of its core: docs/benchmarks.md): the pointer, None (a 304) while it is unchanged,
    the new one after a flip, the store's own errors otherwise."""
    config, s3, _ = store
    ensure_buckets(s3, [config.model_bucket])
    writer = ModelStore(s3, config.model_bucket, "m").pointer
    reader = PointerFile(CurlObjects(ObjectGetter(config), config.model_bucket), "m")
    with pytest.raises(NotFoundError):
        reader.read_if_changed(None)
    written = writer.write(Pointer("v1", "ab" * 32, "t", "me", "r"), replacing=None)
    got = reader.read_if_changed(None)
    assert (got.version, got.etag) == ("v1", written.etag)
    assert reader.read_if_changed(got.etag) is None  # 304: nothing moved
    writer.write(Pointer("v2", "cd" * 32, "t", "me", "r"), replacing=written)
    assert reader.read_if_changed(got.etag).version == "v2"
    away = {**config.env, "LENSFLOW_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    getter = ObjectGetter(Config.from_env(away), timeout_s=2)
    with pytest.raises(StoreUnavailableError):
        PointerFile(CurlObjects(getter, config.model_bucket), "m").read_if_changed(None)
