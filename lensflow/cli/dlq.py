"""`lensflow dlq list|show|replay`: dead letters by reason, one by one, and sent again.

The logic is ``lensflow_eventing.dlq_replay``; this module reads the settings and prints.
"""

from __future__ import annotations

import argparse
import json

from botocore.exceptions import BotoCoreError, ClientError

from lensflow.cli.config import load_config
from lensflow.cli.output import CliError, add_json_flag, emit
from lensflow_core.kafka import connect
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.dlq_replay import (
    ReplayLedger,
    already_replayed,
    group_by_reason,
    parse_since,
    read_dead_letters,
    replay,
    select,
)
from lensflow_eventing.producer import ProduceError, make_producer

LEDGER_PREFIX = "dlq-replayed"


def register(subparsers) -> None:
    dlq = subparsers.add_parser("dlq", help="dead letters: list by reason, show, replay")
    verbs = dlq.add_subparsers(dest="dlq_verb", metavar="VERB")
    verbs.required = True

    listing = verbs.add_parser("list", help="dead letters grouped by reason and status code")
    _filters(listing)
    listing.set_defaults(func=cmd_list)

    show = verbs.add_parser("show", help="single dead letters, with the decoded error data")
    _filters(show)
    show.add_argument("--partition", type=int, help="only this partition of the DLQ topic")
    show.add_argument("--offset", type=int, help="only this offset (with --partition)")
    show.add_argument("-n", "--limit", type=int, default=20, help="at most N, newest last (20)")
    show.set_defaults(func=cmd_show)

    again = verbs.add_parser("replay", help="re-publish the original records to the images topic")
    _filters(again)
    again.add_argument(
        "--dry-run", action="store_true", help="say what would be replayed, change nothing"
    )
    again.set_defaults(func=cmd_replay)


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reason", metavar="TEXT", help="only reasons containing TEXT, or status code TEXT"
    )
    parser.add_argument(
        "--since", metavar="TIME", help="only dead-lettered since TIME (ISO-8601, or 30m, 2h, 1d)"
    )
    add_json_flag(parser)


def ledger_for(config: Config) -> ReplayLedger:
    """Replay markers live in the model bucket, beside the model they were made for."""
    return ReplayLedger(
        s3_client(config, timeout_s=10),
        config.model_bucket,
        f"{config.model_name}/{LEDGER_PREFIX}",
        config.topic_dlq,
    )


def _letters(args: argparse.Namespace, config: Config):
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        connect(config.kafka)  # a refused login or TLS handshake: said at once, on one line
        letters = read_dead_letters(config.kafka, config.topic_dlq, config.topic_images)
    except Exception as exc:  # one line, as every verb fails
        raise CliError(
            f"cannot read {config.topic_dlq} at {config.kafka_bootstrap}: {exc}"
        ) from None
    return select(letters, args.reason, since)


def _replayed(config: Config, letters) -> set[tuple[int, int]]:
    try:
        ledger = ledger_for(config).replayed()
    except Exception as exc:
        raise CliError(f"cannot read the replay markers in {config.model_bucket}: {exc}") from None
    return {d.position for d in letters if already_replayed(d, ledger)}


def cmd_list(args: argparse.Namespace) -> int:
    config = load_config()
    letters = _letters(args, config)
    rows = group_by_reason(letters, _replayed(config, letters))
    if not rows:
        emit(args, [], f"no dead letters in {config.topic_dlq}")
        return 0
    lines = [
        f"{'count':>5} {'code':>4} {'replayable':>10} {'replayed':>8}  oldest .. newest  reason"
    ]
    for r in rows:
        lines.append(
            f"{r['count']:>5} {r['code'] or '-':>4} {r['replayable']:>10} {r['replayed']:>8}  "
            f"{r['oldest']} .. {r['newest']}  {r['reason']}"
        )
    emit(args, rows, "\n".join(lines))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    config = load_config()
    letters = _letters(args, config)
    if args.partition is not None:
        letters = [d for d in letters if d.partition == args.partition]
    if args.offset is not None:
        if args.partition is None:
            raise CliError("--offset needs --partition")
        letters = [d for d in letters if d.offset == args.offset]
        if not letters:
            raise CliError(f"no dead letter at partition {args.partition} offset {args.offset}")
    letters = letters[-args.limit :] if args.limit > 0 else letters
    rows = [d.as_dict() for d in letters]
    blocks = []
    for d in rows:
        blocks.append(
            "\n".join(
                [
                    f"partition {d['partition']} offset {d['offset']}  {d['dead_lettered_at']}  "
                    f"code {d['code'] or '-'}  {'replayable' if d['replayable'] else 'refused'}",
                    f"  key     {d['key']}",
                    f"  event   {d['event_id']}  {d['attributes'].get('type', '-')}",
                    f"  reason  {d['reason']}",
                    f"  reply   {d['error_data'][:300]}",
                    f"  value   {(d['value'] or '')[:300]}",
                ]
                + ([f"  refused {d['refusal']}"] if d["refusal"] else [])
            )
        )
    emit(args, rows, "\n\n".join(blocks) or f"no dead letters in {config.topic_dlq}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    config = load_config()
    letters = _letters(args, config)
    producer = (
        None
        if args.dry_run
        else make_producer(config.kafka, **{"client.id": "lensflow-dlq-replay"})
    )
    try:
        outcome = replay(
            letters,
            producer=producer,
            images_topic=config.topic_images,
            ledger=ledger_for(config),
            dry_run=args.dry_run,
        )
    except ProduceError as exc:
        raise CliError(f"replay stopped, the broker did not confirm a record: {exc}") from None
    except (BotoCoreError, ClientError) as exc:  # the markers: said, and safe to run again
        raise CliError(
            f"replay stopped: the replay markers in {config.model_bucket} could not be read "
            f"or written ({exc}); running it again replays at most the last record twice"
        ) from None
    finally:
        if producer is not None:
            producer.flush(10)
    data = outcome.as_dict()
    verb = "would replay" if args.dry_run else "replayed"
    lines = [f"{verb} {len(outcome.replayed)} record(s) to {config.topic_images}"]
    lines += [
        f"  {d.partition}/{d.offset}  {json.dumps(d.key.decode(errors='replace') if d.key else None)}  ({d.reason})"
        for d in outcome.replayed
    ]
    if outcome.skipped:
        lines.append(f"skipped {len(outcome.skipped)}:")
        lines += [f"  {d.partition}/{d.offset}  {why}" for d, why in outcome.skipped]
    emit(args, data, "\n".join(lines))
    return 0
