"""Verbs that move events: ``upload``, ``predictions tail``, ``dispatch``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from lensflow.cli import archive
from lensflow.cli.config import load_config
from lensflow.cli.output import CliError, add_json_flag, emit
from lensflow.stack import dispatcher_for
from lensflow.upload import upload_files
from lensflow_core.kafka import KafkaSetupError, connect
from lensflow_core.settings import Config
from lensflow_eventing.delivery import DeliverySpec
from lensflow_eventing.dispatcher_metrics import dispatcher_registry, serve_metrics
from lensflow_eventing.predictions import read_predictions
from lensflow_eventing.topics import ensure_topics, topic_specs

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    upload = subparsers.add_parser(
        "upload", help="put images in S3 (the bucket's notification announces them)"
    )
    upload.add_argument("files", nargs="+", metavar="FILE")
    upload.add_argument(
        "--bucket", help="image bucket (default: the first of LENSFLOW_IMAGE_BUCKETS)"
    )
    upload.add_argument("--prefix", default="", help="key prefix (a folder: joined with /)")
    add_json_flag(upload)
    upload.set_defaults(func=cmd_upload)

    predictions = subparsers.add_parser(
        "predictions", help="read the predictions topic, or the archive"
    )
    predictions_sub = predictions.add_subparsers(dest="predictions_verb", metavar="VERB")
    predictions_sub.required = True
    tail = predictions_sub.add_parser("tail", help="show the newest predictions")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new ones")
    tail.add_argument("--from-beginning", action="store_true", help="all of them, oldest first")
    tail.add_argument("-n", "--lines", type=int, default=10, help="how many of the newest (10)")
    add_json_flag(tail)
    tail.set_defaults(func=cmd_predictions_tail)
    archive.register_predictions(predictions_sub)  # query, report: the archive

    dispatch = subparsers.add_parser(
        "dispatch", help="the local KafkaSource: POST image events to a sink until stopped"
    )
    dispatch.add_argument("--sink", required=True, metavar="URL")
    dispatch.add_argument("--ordering", choices=("ordered", "unordered"), default="ordered")
    dispatch.add_argument("--max-in-flight", type=int, default=16, metavar="N")
    dispatch.add_argument("--retry", type=int, default=10, metavar="N")
    dispatch.add_argument(
        "--backoff-policy", choices=("exponential", "linear"), default="exponential"
    )
    dispatch.add_argument("--backoff-delay", type=float, default=0.3, metavar="S")
    dispatch.add_argument(
        "--timeout", type=float, default=600.0, metavar="S", help="per-request timeout"
    )
    dispatch.add_argument("--group", help="consumer group (default: LENSFLOW_SOURCE_GROUP)")
    dispatch.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="P",
        help="serve Prometheus metrics on http://127.0.0.1:P/metrics",
    )
    add_json_flag(dispatch)
    dispatch.set_defaults(func=cmd_dispatch)


def _ensure_topics(config: Config) -> None:
    """Connect (a refused login or TLS handshake stops the verb), then create the topics:
    best effort, as on a managed cluster they exist already and we may lack the right."""
    try:
        ensure_topics(config.kafka, topic_specs(*config.topics), timeout_s=10)
    except KafkaSetupError:
        raise
    except Exception as exc:  # the real operation will say what is wrong
        log.warning("could not check or create topics: %s", exc)


def cmd_upload(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    config = load_config()
    try:
        uploaded = upload_files(config, args.files, args.bucket, args.prefix)
    except FileNotFoundError as exc:
        raise CliError(f"no such file: {exc.filename}") from None
    except (ClientError, BotoCoreError) as exc:
        raise CliError(f"upload failed: {exc}") from None
    rows = [
        {
            "bucket": u.bucket,
            "key": u.key,
            "etag": u.etag,
            "size": u.size,
            "content_type": u.content_type,
        }
        for u in uploaded
    ]
    text = "\n".join(
        f"s3://{r['bucket']}/{r['key']}  {r['size']} bytes  etag {r['etag']}" for r in rows
    )
    emit(args, rows, text)
    return 0


def cmd_predictions_tail(args: argparse.Namespace) -> int:
    config = load_config()
    connect(config.kafka)
    try:
        for prediction in read_predictions(
            config.kafka,
            config.topic_predictions,
            follow=args.follow,
            from_beginning=args.from_beginning,
            last=args.lines,
        ):
            if args.json:  # one JSON object per line: a stream, not a document
                print(json.dumps(prediction.as_dict(), sort_keys=True, default=str), flush=True)
            else:
                print(prediction.line(), flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_dispatch(args: argparse.Namespace) -> int:
    config = load_config()
    logging.getLogger("lensflow_eventing").setLevel(config.log_level.upper())
    _ensure_topics(config)
    try:
        delivery = DeliverySpec(args.retry, args.backoff_policy, args.backoff_delay, args.timeout)
        dispatcher = dispatcher_for(
            config,
            args.sink,
            group_id=args.group or config.source_group,
            delivery=delivery,
            ordering=args.ordering,
            max_in_flight=args.max_in_flight,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None

    def stop(_signum, _frame) -> None:
        dispatcher.stop()

    metrics_server = None
    if args.metrics_port is not None:
        registry = dispatcher_registry(dispatcher.stats, config.topic_images)
        try:
            metrics_server = serve_metrics(registry, args.metrics_port)
        except OSError as exc:
            raise CliError(f"cannot serve metrics on port {args.metrics_port}: {exc}") from None
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    if not args.json:
        print(
            f"dispatching {config.topic_images} to {args.sink} ({args.ordering}); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
    try:
        dispatcher.run()
    except Exception as exc:  # one line, as every verb fails
        raise CliError(f"dispatcher failed: {exc}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics_server is not None:
            metrics_server.shutdown()
    stats = dispatcher.stats()
    emit(
        args,
        stats,
        "stopped: {delivered} delivered, {dead_lettered} dead-lettered, "
        "{retried} retries, {failed} held back".format(**stats),
    )
    return 0
