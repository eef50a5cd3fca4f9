"""lensflow settings: every setting is an environment variable.

This module is the single source of truth for names and defaults. The README's
configuration table, the Knative manifests and the code all derive from
``SETTINGS`` (tests check that they agree). It imports nothing heavy so that
every function can use it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lensflow_core.kafka import KafkaConnection


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    meaning: str
    secret: bool = False
    embedded: bool = False  # only the embedded stack reads it (not in the cluster's config)


# Ports the embedded stack listens on (loopback only).
EMBEDDED_KAFKA_PORT = 19092
EMBEDDED_S3_PORT = 19000
PREDICT_PORT = 8080
TRAIN_PORT = 8081
BACKBONES = ("none", "mobilenet_v2_imagenet")

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "LENSFLOW_KAFKA_BOOTSTRAP",
        f"127.0.0.1:{EMBEDDED_KAFKA_PORT}",
        "Kafka bootstrap servers (`host:port,...`)",
    ),
    Setting(
        "LENSFLOW_KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT",
        "`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL` (see docs/security.md)",
    ),
    Setting(
        "LENSFLOW_KAFKA_SASL_MECHANISM",
        "SCRAM-SHA-512",
        "`SCRAM-SHA-512`, `SCRAM-SHA-256` or `PLAIN` (with a `SASL_*` protocol)",
    ),
    Setting("LENSFLOW_KAFKA_SASL_USERNAME", "", "Kafka user (with a `SASL_*` protocol)"),
    Setting(
        "LENSFLOW_KAFKA_SASL_PASSWORD",
        "",
        "Kafka user's password (with a `SASL_*` protocol)",
        secret=True,
    ),
    Setting(
        "LENSFLOW_KAFKA_CA_FILE",
        "",
        "PEM file of the CA that signed the brokers' certificates (empty: the system's)",
    ),
    Setting("LENSFLOW_KAFKA_CERT_FILE", "", "client certificate (PEM) for mTLS"),
    Setting("LENSFLOW_KAFKA_KEY_FILE", "", "client certificate's key (PEM) for mTLS"),
    Setting(
        "LENSFLOW_S3_ENDPOINT",
        f"http://127.0.0.1:{EMBEDDED_S3_PORT}",
        "S3/MinIO endpoint URL; empty means AWS S3",
    ),
    Setting("LENSFLOW_S3_ACCESS_KEY", "lensflow", "S3 access key", secret=True),
    Setting("LENSFLOW_S3_SECRET_KEY", "lensflow-secret", "S3 secret key", secret=True),
    Setting("LENSFLOW_S3_REGION", "us-east-1", "S3 region"),
    Setting(
        "LENSFLOW_S3_CA_BUNDLE",
        "",
        "PEM file of the CAs to trust for an https S3 endpoint (empty: the system's)",
    ),
    Setting(
        "LENSFLOW_IMAGE_BUCKETS",
        "drone-images",
        "comma-separated allow-list of buckets the predict function may read",
    ),
    Setting("LENSFLOW_MODEL_BUCKET", "lensflow-models", "bucket of the model store"),
    Setting("LENSFLOW_MODEL_NAME", "aerial", "which model (prefix in the model bucket)"),
    Setting(
        "LENSFLOW_TRAIN_BUCKET",
        "lensflow-train",
        "bucket with `to-label/...`, `labeled/<class>/...` and `holdout/<class>/...`: one of "
        "its own, so that what lensflow writes never arrives as an image event",
    ),
    Setting(
        "LENSFLOW_ARCHIVE_BUCKET",
        "lensflow-archive",
        "bucket of the predictions archive (Parquet, `predictions/date=YYYY-MM-DD/`)",
    ),
    Setting(
        "LENSFLOW_ARCHIVE_GROUP",
        "lensflow-archive",
        "consumer group of the archiver on the predictions topic",
    ),
    Setting(
        "LENSFLOW_ARCHIVE_BATCH",
        "5000",
        "most predictions the archiver holds before it writes them (per file at most)",
    ),
    Setting(
        "LENSFLOW_ARCHIVE_FLUSH_S",
        "5",
        "longest a prediction waits in a following archiver before it is written (seconds)",
    ),
    Setting("LENSFLOW_TOPIC_IMAGES", "images", "topic of bucket-notification records"),
    Setting(
        "LENSFLOW_S3_NOTIFY_BUCKETS",
        "",
        "buckets whose new objects the embedded S3 announces on the images topic, as "
        "`mc event add BUCKET arn:minio:sqs::_:kafka --event put` does on MinIO (empty: the "
        "image buckets)",
        embedded=True,
    ),
    Setting(
        "LENSFLOW_S3_NOTIFY_PREFIX",
        "",
        "the embedded S3 announces only keys starting with this (`mc event add --prefix`)",
        embedded=True,
    ),
    Setting(
        "LENSFLOW_S3_NOTIFY_SUFFIX",
        "",
        "the embedded S3 announces only keys ending with this (`mc event add --suffix`, "
        "e.g. `.jpg`)",
        embedded=True,
    ),
    Setting(
        "LENSFLOW_S3_NOTIFY_QUEUE_DIR",
        "",
        "where the embedded S3 keeps each event, one file apiece, until the broker has it "
        "(MinIO's `queue_dir`; empty: a new folder per server, removed when it stops)",
        embedded=True,
    ),
    Setting("LENSFLOW_TOPIC_PREDICTIONS", "predictions", "topic of prediction events"),
    Setting("LENSFLOW_TOPIC_DLQ", "images-dlq", "dead-letter topic"),
    Setting(
        "LENSFLOW_POINTER_TTL_S",
        "1.0",
        "how stale a replica's view of the model pointer may get (seconds)",
    ),
    Setting("LENSFLOW_MAX_IMAGE_BYTES", str(32 * 1024 * 1024), "largest image object accepted"),
    Setting(
        "LENSFLOW_MAX_IMAGE_PIXELS",
        str(64_000_000),
        "largest decoded image (width x height) accepted",
    ),
    Setting(
        "LENSFLOW_MAX_EVENT_BYTES",
        str(1024 * 1024),
        "largest request body (event) the predict function reads; larger is 413",
    ),
    Setting(
        "LENSFLOW_DECODE_BUDGET_MB",
        "512",
        "memory a predict replica may spend on image decodes at once (see docs/autoscaling.md)",
    ),
    Setting(
        "LENSFLOW_TRAIN_METRIC",
        "macro_f1",
        "metric a challenger must win on: `accuracy` or `macro_f1`",
    ),
    Setting(
        "LENSFLOW_TRAIN_MARGIN",
        "0.01",
        "how much better (absolute) the challenger must score to be promoted",
    ),
    Setting(
        "LENSFLOW_TRAIN_MIN_NEW",
        "20",
        "fewest labelled entries (key, ETag, class) new or changed since the champion's "
        "round to train again",
    ),
    Setting(
        "LENSFLOW_TRAIN_BACKBONE",
        "none",
        "what rounds train on: `none` (a small CNN from scratch) or `mobilenet_v2_imagenet` "
        "(the pretrained backbone stored by `lensflow models backbone import`)",
    ),
    Setting("LENSFLOW_TRAIN_EPOCHS", "8", "training epochs per round"),
    Setting(
        "LENSFLOW_UNCERTAIN_TOP1",
        "0.6",
        "a prediction whose top-1 score is below this is queued for labelling (`to-label/`)",
    ),
    Setting(
        "LENSFLOW_UNCERTAIN_MARGIN",
        "0.2",
        "a prediction whose top-1 leads the second by less than this is queued for labelling",
    ),
    Setting(
        "LENSFLOW_LABEL_QUEUE_MAX",
        "500",
        "most images queued for labelling per model version (0: no queue)",
    ),
    Setting(
        "LENSFLOW_TRAIN_SCHEDULE",
        "0 3 * * *",
        "when scheduled rounds run (cron, UTC; the training PingSource's schedule): the "
        "dashboard shows the next one",
    ),
    Setting(
        "LENSFLOW_TRAIN_LEASE_TTL_S",
        "3600",
        "how long a round's lease (`<model>/lock.json`) holds off other rounds (seconds; "
        "at least the training Job's activeDeadlineSeconds)",
    ),
    Setting(
        "LENSFLOW_TRAIN_MAX_IMAGES",
        "7000",
        "most labelled plus holdout images a round loads; a larger round is refused "
        "(the default fits the training Job's 3Gi with either backbone; docs/training.md)",
    ),
    Setting(
        "LENSFLOW_TRAIN_QUANTIZATION",
        "float32,float16,int8",
        "the artifacts a round builds, comma-separated: `float32`, `float16` (half-size "
        "weights), `int8` (full-integer, uint8 in and out); each judged as built, the "
        "fastest within LENSFLOW_TRAIN_TOLERANCE of the best is published (docs/training.md)",
    ),
    Setting(
        "LENSFLOW_TRAIN_TOLERANCE",
        "1",
        "points (0 to 10) of LENSFLOW_TRAIN_METRIC a faster artifact may lose against the "
        "round's best one and still be the one published",
    ),
    Setting(
        "LENSFLOW_BATCH_DELAY_MS",
        "0",
        "longest a predict replica holds a request to batch it with others on their way "
        "(0: no batching; 2 is Triton's kind of default, off here: docs/benchmarks.md)",
    ),
    Setting("LENSFLOW_BATCH_MAX", "4", "most images a predict replica runs in one invoke"),
    Setting(
        "LENSFLOW_SOURCE_NAME",
        "lensflow-images",
        "KafkaSource name used in `ce-source` by the local dispatcher",
    ),
    Setting(
        "LENSFLOW_SOURCE_GROUP",
        "lensflow-predict",
        "consumer group of the KafkaSource on the images topic (its `consumerGroup`): the "
        "local dispatcher's group and the one whose lag the dashboard shows",
    ),
    Setting(
        "LENSFLOW_NAMESPACE", "default", "namespace used in `ce-source` by the local dispatcher"
    ),
    Setting("LENSFLOW_LOG_LEVEL", "INFO", "log level of functions and dispatcher"),
    Setting(
        "LENSFLOW_DASHBOARD_TOKEN",
        "",
        "token that allows flip and rollback from the dashboard (empty: they are off)",
        secret=True,
    ),
    Setting(
        "LENSFLOW_LOG_FORMAT",
        "text",
        "log lines as `text` or `json` (with trace id, event id, object key, model version)",
    ),
)

QUANTIZATIONS = ("float32", "float16", "int8")


def _quantizations(value: str) -> tuple[str, ...]:
    """The artifacts a round builds, in order, each once; refused before any round starts
    when the predict runtime could not feed one (an int16 input, a name it does not know)."""
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in QUANTIZATIONS]
    if unknown or not names:
        raise ValueError(
            f"LENSFLOW_TRAIN_QUANTIZATION: the predict runtime cannot feed "
            f"{', '.join(map(repr, unknown)) or 'no artifact'}; choose from "
            f"{', '.join(QUANTIZATIONS)} (comma-separated)"
        )
    return names


_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def default(name: str) -> str:
    """The default of setting ``name``."""
    return _BY_NAME[name].default


def _get(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    return _BY_NAME[name].default if value is None else value


@dataclass(frozen=True)
class Config:
    """Resolved settings. Build with ``Config.from_env()``."""

    kafka_bootstrap: str
    kafka: KafkaConnection  # bootstrap, TLS and SASL: what every Kafka client is made from
    s3_endpoint: str | None
    s3_access_key: str = field(repr=False)  # credentials never reach a log line
    s3_secret_key: str = field(repr=False)
    s3_region: str
    s3_ca_bundle: str | None
    image_buckets: tuple[str, ...]
    model_bucket: str
    model_name: str
    train_bucket: str
    archive_bucket: str
    archive_group: str
    archive_batch: int
    archive_flush_s: float
    topic_images: str
    notify_buckets: tuple[str, ...]  # what the embedded S3 announces (MinIO: mc event add)
    notify_prefix: str
    notify_suffix: str
    notify_queue_dir: str | None
    topic_predictions: str
    topic_dlq: str
    pointer_ttl_s: float
    max_image_bytes: int
    max_image_pixels: int
    max_event_bytes: int
    decode_budget_mb: int
    train_metric: str
    train_margin: float
    train_min_new: int
    train_epochs: int
    train_backbone: str
    uncertain_top1: float
    uncertain_margin: float
    label_queue_max: int
    train_lease_ttl_s: float
    train_schedule: str
    train_max_images: int
    source_name: str
    source_group: str
    namespace: str
    log_level: str
    train_quantization: tuple[str, ...]
    train_tolerance: float  # points of train_metric (x100)
    batch_delay_ms: float
    batch_max: int
    log_format: str
    dashboard_token: str = field(repr=False)
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return _get(env, name)

        return cls(
            **_connections(env, get),
            **_buckets_and_topics(get),
            **_limits(get),
            **_training(get),
            **_running(get),
            env=dict(env),
        )

    @property
    def buckets(self) -> list[str]:
        """Every bucket lensflow uses: image, train, model and archive buckets (once each)."""
        return list(
            dict.fromkeys(
                [*self.image_buckets, self.train_bucket, self.model_bucket, self.archive_bucket]
            )
        )

    @property
    def topics(self) -> tuple[str, str, str]:
        """(images, predictions, dead-letter) topic names."""
        return self.topic_images, self.topic_predictions, self.topic_dlq

    @property
    def kafkasource_ce_source(self) -> str:
        """The `ce-source` a KafkaSource named ``source_name`` gives records of ``topic_images``."""
        return (
            f"/apis/v1/namespaces/{self.namespace}/kafkasources/"
            f"{self.source_name}#{self.topic_images}"
        )


# Config.from_env's parts: each reads and checks one group of settings.
Get = Callable[[str], str]


def _connections(env: Mapping[str, str], get: Get) -> dict[str, Any]:
    return {
        "kafka_bootstrap": get("LENSFLOW_KAFKA_BOOTSTRAP"),
        "kafka": KafkaConnection.from_env(env, get("LENSFLOW_KAFKA_BOOTSTRAP")),
        "s3_endpoint": get("LENSFLOW_S3_ENDPOINT") or None,
        "s3_access_key": get("LENSFLOW_S3_ACCESS_KEY"),
        "s3_secret_key": get("LENSFLOW_S3_SECRET_KEY"),
        "s3_region": get("LENSFLOW_S3_REGION"),
        "s3_ca_bundle": get("LENSFLOW_S3_CA_BUNDLE") or None,
    }


def _buckets_and_topics(get: Get) -> dict[str, Any]:
    buckets = tuple(b.strip() for b in get("LENSFLOW_IMAGE_BUCKETS").split(",") if b.strip())
    if not buckets:
        raise ValueError("LENSFLOW_IMAGE_BUCKETS names no bucket")
    return {
        "image_buckets": buckets,
        "model_bucket": get("LENSFLOW_MODEL_BUCKET"),
        "model_name": get("LENSFLOW_MODEL_NAME"),
        "train_bucket": get("LENSFLOW_TRAIN_BUCKET") or default("LENSFLOW_TRAIN_BUCKET"),
        "archive_bucket": get("LENSFLOW_ARCHIVE_BUCKET"),
        "archive_group": get("LENSFLOW_ARCHIVE_GROUP"),
        "archive_batch": max(1, int(get("LENSFLOW_ARCHIVE_BATCH"))),
        "archive_flush_s": max(0.0, float(get("LENSFLOW_ARCHIVE_FLUSH_S"))),
        "topic_images": get("LENSFLOW_TOPIC_IMAGES"),
        "notify_buckets": _notify_buckets(get("LENSFLOW_S3_NOTIFY_BUCKETS")) or buckets,
        "notify_prefix": _filter_value("LENSFLOW_S3_NOTIFY_PREFIX", get),
        "notify_suffix": _filter_value("LENSFLOW_S3_NOTIFY_SUFFIX", get),
        "notify_queue_dir": get("LENSFLOW_S3_NOTIFY_QUEUE_DIR") or None,
        "topic_predictions": get("LENSFLOW_TOPIC_PREDICTIONS"),
        "topic_dlq": get("LENSFLOW_TOPIC_DLQ"),
    }


def _limits(get: Get) -> dict[str, Any]:
    return {
        "pointer_ttl_s": float(get("LENSFLOW_POINTER_TTL_S")),
        "max_image_bytes": int(get("LENSFLOW_MAX_IMAGE_BYTES")),
        "max_image_pixels": int(get("LENSFLOW_MAX_IMAGE_PIXELS")),
        "max_event_bytes": int(get("LENSFLOW_MAX_EVENT_BYTES")),
        "decode_budget_mb": int(get("LENSFLOW_DECODE_BUDGET_MB")),
        "uncertain_top1": float(get("LENSFLOW_UNCERTAIN_TOP1")),
        "uncertain_margin": float(get("LENSFLOW_UNCERTAIN_MARGIN")),
        "label_queue_max": int(get("LENSFLOW_LABEL_QUEUE_MAX")),
        "batch_delay_ms": max(0.0, float(get("LENSFLOW_BATCH_DELAY_MS"))),
        "batch_max": max(1, int(get("LENSFLOW_BATCH_MAX"))),
    }


def _training(get: Get) -> dict[str, Any]:
    metric = get("LENSFLOW_TRAIN_METRIC")
    if metric not in ("accuracy", "macro_f1"):
        raise ValueError(f"LENSFLOW_TRAIN_METRIC must be accuracy or macro_f1, not {metric!r}")
    backbone = get("LENSFLOW_TRAIN_BACKBONE")
    if backbone not in BACKBONES:
        raise ValueError(
            f"LENSFLOW_TRAIN_BACKBONE must be one of {', '.join(BACKBONES)}, not {backbone!r}"
        )
    quantization = _quantizations(get("LENSFLOW_TRAIN_QUANTIZATION"))
    tolerance = float(get("LENSFLOW_TRAIN_TOLERANCE"))
    if not 0 <= tolerance <= 10:
        raise ValueError(
            f"LENSFLOW_TRAIN_TOLERANCE must be 0 to 10 points of {metric}, not {tolerance:g}"
        )
    return {
        "train_metric": metric,
        "train_margin": float(get("LENSFLOW_TRAIN_MARGIN")),
        "train_min_new": int(get("LENSFLOW_TRAIN_MIN_NEW")),
        "train_epochs": int(get("LENSFLOW_TRAIN_EPOCHS")),
        "train_backbone": backbone,
        "train_lease_ttl_s": float(get("LENSFLOW_TRAIN_LEASE_TTL_S")),
        "train_schedule": get("LENSFLOW_TRAIN_SCHEDULE"),
        "train_max_images": int(get("LENSFLOW_TRAIN_MAX_IMAGES")),
        "train_quantization": quantization,
        "train_tolerance": tolerance,
    }


def _running(get: Get) -> dict[str, Any]:
    log_format = get("LENSFLOW_LOG_FORMAT").strip().lower()
    if log_format not in ("text", "json"):
        raise ValueError(f"LENSFLOW_LOG_FORMAT must be text or json, not {log_format!r}")
    return {
        "source_name": get("LENSFLOW_SOURCE_NAME"),
        "source_group": get("LENSFLOW_SOURCE_GROUP"),
        "namespace": get("LENSFLOW_NAMESPACE"),
        "log_level": get("LENSFLOW_LOG_LEVEL"),
        "log_format": log_format,
        "dashboard_token": get("LENSFLOW_DASHBOARD_TOKEN"),
    }


_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _notify_buckets(text: str) -> tuple[str, ...]:
    buckets = tuple(b.strip() for b in text.split(",") if b.strip())
    for bucket in buckets:
        if not _BUCKET_NAME.match(bucket) or ".." in bucket:
            raise ValueError(f"LENSFLOW_S3_NOTIFY_BUCKETS: {bucket!r} is not a bucket name")
    return buckets


def _filter_value(name: str, get) -> str:
    """A prefix or suffix filter, refused as MinIO refuses it (``ValidateFilterRuleValue``
    in minio/minio internal/event/config.go): no ``.`` or ``..`` path segment, no
    backslash, at most 1024 bytes."""
    value = get(name)
    if not value:
        return value
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # undecodable bytes in the environment
        size = 1025
    if {".", ".."} & set(value.split("/")) or "\\" in value or size > 1024:
        raise ValueError(
            f"{name}={value!r} is not a filter MinIO accepts (no '.' or '..' path segment, "
            "no backslash, at most 1024 bytes of UTF-8)"
        )
    return value


def settings_table() -> str:
    """The README's configuration table, rendered from ``SETTINGS``."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "(empty)"
        rows.append(f"| `{s.name}` | {default} | {s.meaning} |")
    return "\n".join(rows)
