"""`lensflow label ...`: the labelling queue, and a person's labels for queued images.

    lensflow label list                     queued images, most uncertain first
    lensflow label CLASS KEY...             copy into labeled/CLASS/, off the queue
    lensflow label holdout CLASS KEY...     the same into holdout/CLASS/ (people only)
    lensflow label undo KEY...              undo the label that stands: off labeled/, queued again

KEY is ``<bucket>/<key>`` (as ``label list`` and prediction events name images). The
logic lives in ``lensflow_model_store.label_images`` and ``lensflow_model_store.label_queue``; this is the
person's door to it.
"""

from __future__ import annotations

import argparse

from lensflow.cli.config import load_config
from lensflow.cli.models import operator
from lensflow.cli.output import CliError, add_json_flag, emit
from lensflow_core.s3 import s3_client
from lensflow_model_store import ModelStore, ModelStoreError, StoreUnavailableError
from lensflow_model_store.label_images import LabelRefused, label, serving_labels, undo
from lensflow_model_store.label_queue import LabelQueue
from lensflow_model_store.layout import HOLDOUT, LABELED


def _queue(config, s3) -> LabelQueue:
    return LabelQueue(s3, config.train_bucket, config.label_queue_max)


def cmd_list(args: argparse.Namespace) -> int:
    config = load_config()
    entries = _queue(config, s3_client(config)).pending()
    if args.limit:
        entries = entries[: args.limit]
    rows = [e.to_json() for e in entries]
    lines = [
        f"{e.margin:6.3f} {e.top1:6.3f}  {e.model.get('version', '?'):<5} {e.path}  "
        f"({_top_text(e.top)})"
        for e in entries
    ]
    header = " margin   top1  model image  (top classes)"
    emit(args, rows, "\n".join([header, *lines]) if lines else "the labelling queue is empty")
    return 0


def _top_text(top: list[dict]) -> str:
    return ", ".join(f"{p.get('label')} {float(p.get('score', 0)):.2f}" for p in top)


def cmd_label(args: argparse.Namespace) -> int:
    words = list(args.words)
    if not words:
        raise CliError("usage: lensflow label list | CLASS KEY... | holdout CLASS KEY...")
    if words[0] == "list":
        if len(words) > 1:
            raise CliError("`label list` takes no images")
        return cmd_list(args)
    if words[0] == "undo":
        return cmd_undo(args, words[1:])
    split = LABELED
    if words[0] == HOLDOUT:
        split, words = HOLDOUT, words[1:]
    if len(words) < 2:
        raise CliError(
            f"usage: lensflow label {'holdout ' if split == HOLDOUT else ''}CLASS KEY..."
        )
    cls, paths = words[0], words[1:]
    config = load_config()
    s3 = s3_client(config)
    known = serving_labels(ModelStore.from_config(config, s3))
    done = label(
        s3,
        train_bucket=config.train_bucket,
        image_buckets=config.image_buckets,
        known_labels=known,
        cls=cls,
        paths=paths,
        split=split,
        by=operator(),
        queue=_queue(config, s3),
    )
    lines = [
        f"{item.source} -> s3://{config.train_bucket}/{item.target}"
        + (" (already there)" if item.unchanged else "")
        + (f" (moved from {', '.join(item.replaced)})" if item.replaced else "")
        for item in done
    ]
    emit(args, [item.to_json() for item in done], "\n".join(lines))
    return 0


def cmd_undo(args: argparse.Namespace, paths: list[str]) -> int:
    if not paths:
        raise CliError("usage: lensflow label undo KEY...")
    config = load_config()
    s3 = s3_client(config)
    done = [
        undo(s3, train_bucket=config.train_bucket, path=p, by=operator(), queue=_queue(config, s3))
        for p in paths
    ]
    lines = [f"{d.image}: undid {d.target} (queued again)" for d in done]
    emit(args, [d.to_json() for d in done], "\n".join(lines))
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        return cmd_label(args)
    except LabelRefused as exc:
        raise CliError(f"refused, nothing labelled: {exc}") from None
    except StoreUnavailableError as exc:
        raise CliError(f"{exc}; is the stack running (`lensflow up`)?") from None
    except ModelStoreError as exc:
        raise CliError(f"{type(exc).__name__}: {exc}") from None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "label",
        help="the labelling queue: `label list`, `label CLASS KEY...`, `label holdout CLASS KEY...`, "
        "`label undo KEY...`",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("words", nargs="*", metavar="list | [holdout] CLASS KEY... | undo KEY...")
    parser.add_argument("--limit", type=int, default=0, help="with list: show at most N images")
    add_json_flag(parser)
    parser.set_defaults(func=_run)
