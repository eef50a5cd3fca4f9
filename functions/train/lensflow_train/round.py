"""One training round: check the data, train a challenger, judge it against the champion on
the holdout (both as ``.tflite`` artifacts in LiteRT), publish it, promote it if it is better.

The champion is whatever the model pointer names. A challenger is always published (with
its metrics, Keras weights and this report) but the pointer moves only when the challenger
wins by ``config.train_margin`` on ``config.train_metric``, by compare-and-swap against the
champion that was evaluated, and never while an operator has pinned the pointer.

The challenger is built in several forms (``lensflow_train.artifacts``): the best one on
the holdout is judged against the champion, the fastest within ``config.train_tolerance``
points of it is the one published (docs/training.md, "Which artifact is served").
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lensflow_core.runtime import DEFAULT_OFFSET, DEFAULT_SCALE
from lensflow_core.settings import Config
from lensflow_model_store import (
    NO_POINTER,
    ConflictError,
    IntegrityError,
    InvalidModelError,
    ModelStore,
    NotFoundError,
    PinnedError,
    VersionInfo,
    layout,
)
from lensflow_model_store.backbones import backbone_path, get_backbone
from lensflow_model_store.rounds import decision_of
from lensflow_train import artifacts, dataset
from lensflow_train import fingerprint as fp
from lensflow_train.artifacts import Artifact
from lensflow_train.evaluate import Evaluation, evaluate_pictures
from lensflow_train.reports import keep as keep_report

log = logging.getLogger(__name__)

MIN_OVER_CHANCE = 0.10  # a first model must beat guessing (1/classes) by this much to serve
CREATED_BY = "train"


@dataclass
class ProgressEvent:
    """What a round is doing now. ``done``/``total`` count epochs during ``train``."""

    stage: str  # data, load, train, convert, evaluate, publish, promote, done
    message: str
    done: int | None = None
    total: int | None = None
    logs: dict[str, float] = field(default_factory=dict)


Progress = Callable[[ProgressEvent], None]


@dataclass
class RoundReport:
    round_id: str
    model: str
    started_at: float
    outcome: str = "skipped"  # skipped | promoted | not_promoted ("promoting" until the flip)
    reason: str = ""
    metric: str = "macro_f1"
    margin: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    champion: dict[str, Any] | None = None
    challenger: dict[str, Any] | None = None
    pointer: str | None = None  # the version the pointer names when the round ends
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def begin(cls, config: Config, **fields: Any) -> RoundReport:
        """The report of a round starting now (``fields``: a reason, for one refused)."""
        return cls(
            round_id=uuid.uuid4().hex[:12],
            model=config.model_name,
            started_at=round(time.time(), 3),
            metric=config.train_metric,
            margin=config.train_margin,
            **fields,
        )

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"

    def to_dict(self) -> dict[str, Any]:
        """The report as stored, printed and shown, with its decision
        (``lensflow_model_store.rounds``; none while the flip is still to come)."""
        data = {**asdict(self), "promoted": self.promoted}
        return {**data, "decision": None if self.outcome == "promoting" else decision_of(data)}


class _Clock:
    def __init__(self, report: RoundReport):
        self.report = report
        self.start = time.perf_counter()
        self.last = self.start

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.report.timings[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> None:
        self.report.timings["total_s"] = round(time.perf_counter() - self.start, 3)


def run_round(
    config: Config,
    *,
    progress: Progress | None = None,
    force: bool = False,
    s3=None,
    store: ModelStore | None = None,
    seed: int = 0,
) -> RoundReport:
    """Run one round and say what happened; changes nothing when there is nothing to learn.

    Raises lensflow_model_store.StoreUnavailableError / botocore errors when S3 cannot be reached.
    """
    from lensflow_core.s3 import s3_client

    s3 = s3 or s3_client(config)
    store = store or ModelStore.from_config(config, s3)
    report = RoundReport.begin(config)
    clock = _Clock(report)

    def say(stage: str, message: str, **kw: Any) -> None:
        log.info("round %s: %s", report.round_id, message)
        if progress is not None:
            progress(ProgressEvent(stage, message, **kw))

    try:
        _Round(config, s3, store, report, clock, say, seed).run(force)
    finally:
        clock.total()
    keep_report(store, report)
    say("done", f"{report.outcome}: {report.reason}")
    return report


@dataclass
class _Data:
    """What the gate found: the splits, the pointer, the champion and its baseline."""

    labeled: dataset.Split
    holdout: dataset.Split
    champion: VersionInfo | None
    entries: list[fp.Entry]
    pretrained: tuple[dict, dict] | None = None


@dataclass
class _Trained:
    """The challenger as Keras left it, and the pictures it was trained and is judged on."""

    keras_model: Any
    labels: list[str]
    arch: str
    size: dataset.Size
    spec: dict
    x: np.ndarray
    judge: dataset.Pictures
    fold: Any = None  # the model with its normalisation folded into the stem, if it has one


@dataclass
class _Verdict:
    """The artifact published, the one judged, and whether the pointer should move."""

    published: Artifact
    best: Artifact
    promote: bool
    why: str
    champion_eval: Evaluation | None = None


class _Round:
    """One round's steps, in order, each filling the report: ``gate`` (whether the round
    runs: no TensorFlow), ``train``, ``judge``, ``publish``, ``promote``."""

    def __init__(self, config: Config, s3, store: ModelStore, report, clock, say, seed: int):
        self.config, self.s3, self.store = config, s3, store
        self.report, self.clock, self.say, self.seed = report, clock, say, seed

    def run(self, force: bool) -> None:
        data = self.gate(force)
        if data is None:
            return
        trained = self.train(data)
        if trained is None:
            return
        verdict = self.judge(data, trained)
        info = self.publish(data, trained, verdict)
        if verdict.promote:
            self.promote(data, verdict, info)

    # --- gate: whether there is anything to learn (the report's reason when not) -------

    def gate(self, force: bool) -> _Data | None:
        config, report, bucket = self.config, self.report, self.config.train_bucket
        self.say("data", f"listing s3://{bucket}/{layout.LABELED}/ and /{layout.HOLDOUT}/")
        labeled, holdout = dataset.Split(layout.LABELED), dataset.Split(layout.HOLDOUT)
        if _bucket_exists(self.s3, bucket):
            labeled = dataset.list_split(self.s3, bucket, layout.LABELED)
            holdout = dataset.list_split(self.s3, bucket, layout.HOLDOUT)
        pointer = self.store.current()
        champion = _champion(self.store, pointer.version) if pointer else None
        baseline = _baseline(self.store, champion)
        data = _Data(
            labeled, holdout, champion, fp.entries(labeled.keys, labeled.etags, labeled.classes)
        )
        since_champion = _changes(self.store, champion, data.entries, len(labeled))
        since_baseline = _changes(self.store, baseline, data.entries, len(labeled))
        report.pointer = pointer.version if pointer else None
        report.data = {
            "bucket": bucket,
            "labeled": labeled.counts,
            "labeled_total": len(labeled),
            "holdout": holdout.counts,
            "holdout_total": len(holdout),
            "fingerprint": fp.digest(data.entries),
            "new_since_champion": since_champion.new,
            "removed_since_champion": since_champion.removed,
            "new_since_last_round": since_baseline.new,
            "removed_since_last_round": since_baseline.removed,
            "backbone": config.train_backbone,
        }
        self.clock.lap("list_s")
        report.reason = _refusal(config, data, baseline, since_baseline.new, force)
        if report.reason:
            return None
        if config.train_backbone != "none":
            try:
                data.pretrained = _load_backbone(self.store, config.train_backbone)
            except (NotFoundError, IntegrityError, ValueError) as exc:
                report.reason = (
                    f"LENSFLOW_TRAIN_BACKBONE is {config.train_backbone} but {exc}; store it "
                    f"with `lensflow models backbone import` (at "
                    f"{backbone_path(self.store, config.train_backbone)})"
                )
                return None
        return data

    # --- train: the challenger in Keras ------------------------------------------------

    def train(self, data: _Data) -> _Trained | None:
        from lensflow_train import model as M  # TensorFlow: only now, only here

        config, say = self.config, self.say
        self.clock.lap("import_s")
        arch, size, spec = M.ARCH, M.INPUT_SIZE, dict(M.INPUT_SPEC)
        if data.pretrained is not None:
            from lensflow_train import finetune as F

            arch, size, spec = F.ARCH, F.INPUT_SIZE, F.input_spec(data.pretrained[1])
        labeled, holdout = data.labeled, data.holdout
        sizes = [size, *([champ] if (champ := _input_size(data.champion)) else [])]
        say(
            "load",
            f"fetching and decoding {len(labeled)} labelled and {len(holdout)} holdout images",
        )
        limits = {"max_pixels": config.max_image_pixels, "max_bytes": config.max_image_bytes}
        train_set = dataset.load(self.s3, config.train_bucket, labeled, [size], **limits)
        judge = dataset.load(self.s3, config.train_bucket, holdout, sizes, **limits)
        self.clock.lap("load_s")
        labels = labeled.labels
        index = {label: i for i, label in enumerate(labels)}
        x, y = train_set.arrays[size], np.array([index[c] for c in train_set.classes])
        self.report.data["skipped_undecodable"] = {
            "labeled": train_set.undecodable,
            "holdout": judge.undecodable,
        }
        if len(set(y.tolist())) < 2 or not len(judge):
            self.report.reason = "too few decodable images: need two labelled classes and a holdout"
            return None
        trained = _Trained(None, labels, arch, size, spec, x, judge)
        self._fit(data, trained, y)
        return trained

    def _fit(self, data: _Data, trained: _Trained, y: np.ndarray) -> None:
        """Build and train ``trained.keras_model`` (warm from the champion where it fits)."""
        from lensflow_train import model as M

        config, say, seed, x = self.config, self.say, self.seed, trained.x
        epochs, labels, arch = config.train_epochs, trained.labels, trained.arch

        def on_epoch(e: int, n: int, logs: dict[str, float]) -> None:
            say(
                "train", f"epoch {e}/{n} loss {logs.get('loss', 0):.3f}", done=e, total=n, logs=logs
            )

        if data.pretrained is None:
            keras_model = M.build_model(len(labels), seed=seed)
            warm = _warm_start(self.store, data.champion, labels, keras_model, arch, M)
            start = f"training on {len(x)} images, {epochs} epochs ({warm or 'from scratch'})"
            say("train", start, done=0, total=epochs)
            history = M.train(keras_model, x, y, epochs, on_epoch, seed=seed)
        else:
            from lensflow_train import finetune as F

            keras_model, classifier = F.build(len(labels), *data.pretrained, seed=seed)
            warm = _warm_start(self.store, data.champion, labels, keras_model, arch, M)
            phase = "fine-tuning the top blocks" if warm else "training a new head, backbone frozen"
            start = f"{phase} on {len(x)} images, {epochs} epochs ({warm or 'from ' + config.train_backbone})"
            say("train", start, done=0, total=epochs)
            fit = F.fine_tune if warm else F.train_head
            history = fit(keras_model, classifier, x, y, epochs, on_epoch, seed=seed)
            trained.fold = F.fold_normalisation(keras_model)
        self.clock.lap("train_s")
        trained.keras_model = keras_model
        self.report.challenger = {
            "labels": labels,
            "warm_start": warm,
            "epochs": epochs,
            "history": history,
        }

    # --- judge: every artifact on the holdout, the best against the champion -----------

    def judge(self, data: _Data, trained: _Trained) -> _Verdict:
        config, report, metric = self.config, self.report, self.config.train_metric
        forms = ", ".join(config.train_quantization)
        self.say("convert", f"converting to TFLite ({forms}{', folded' if trained.fold else ''})")
        built = artifacts.convert(
            trained.keras_model, config.train_quantization, trained.x, trained.fold
        )
        self.clock.lap("convert_s")
        judge, size, spec = trained.judge, trained.size, trained.spec
        self.say(
            "evaluate",
            f"evaluating {len(built)} artifacts and the champion on {len(judge)} holdout images (LiteRT)",
        )
        for artifact in built:
            artifact.evaluation = evaluate_pictures(
                artifact.tflite,
                trained.labels,
                judge.arrays[size],
                judge.classes,
                scale=spec["scale"],
                offset=spec["offset"],
            )
        artifacts.time_artifacts(built, judge.arrays[size], spec["scale"], spec["offset"])
        published, best, why_artifact = artifacts.choose(built, metric, config.train_tolerance)
        champion, champ_eval, champ_problem = data.champion, None, None
        if champion is not None:
            champ_eval, champ_problem = _evaluate_champion(self.store, champion, judge)
            report.champion = {
                "version": champion.version,
                "labels": champion.labels,
                "evaluation": champ_eval.to_dict() if champ_eval else None,
                "problem": champ_problem,
            }
        self.clock.lap("evaluate_s")
        report.challenger.update(
            size_bytes=len(published.tflite),
            quantization=published.quantization,
            artifact=published.name,
            artifact_reason=why_artifact,
            judged_by=best.name,
            tolerance=config.train_tolerance,
            artifacts=[a.to_dict(metric) for a in built],
            evaluation=published.evaluation.to_dict(),
        )
        promote, why = _decide(config, best.evaluation, champion, champ_eval, champ_problem)
        return _Verdict(published, best, promote, why, champ_eval)

    # --- publish: the chosen artifact, always; promote: the pointer, by CAS ------------

    def publish(self, data: _Data, trained: _Trained, verdict: _Verdict) -> VersionInfo:
        from lensflow_train import model as M

        report, artifact = self.report, verdict.published
        self.say("publish", f"publishing the challenger ({artifact.name})")
        metrics = {
            **artifact.evaluation.summary(),
            "labeled_images": len(data.labeled),
            "holdout_images": len(trained.judge),
            fp.METRIC: report.data["fingerprint"],
            "arch": trained.arch,
            "backbone": self.config.train_backbone,
            "quantization": artifact.quantization,
            "artifact": artifact.name,
            "round_id": report.round_id,
        }
        spec = dict(trained.spec)
        if artifact.folded:  # the same input; the normalisation now lives in the stem
            spec["normalisation"] = {**spec.get("normalisation", {}), "folded_into_stem": True}
        # What report.json (stored with the version) says; the flip's outcome comes after.
        report.outcome = "promoting" if verdict.promote else "not_promoted"
        report.reason = verdict.why if verdict.promote else f"not promoted: {verdict.why}"
        champion = data.champion
        info = self.store.publish(
            artifact.tflite,
            trained.labels,
            metrics=metrics,
            parent=champion.version if champion else None,
            input_spec=spec,
            extra_files={
                M.WEIGHTS_FILE: M.weights_bytes(trained.keras_model),
                fp.FILE: fp.to_bytes(data.entries),
                "report.json": json.dumps(report.to_dict(), indent=2, default=str).encode(),
            },
            created_by=CREATED_BY,
        )
        report.challenger["version"] = info.version
        report.challenger["sha256"] = info.sha256
        self.clock.lap("publish_s")
        return info

    def promote(self, data: _Data, verdict: _Verdict, info: VersionInfo) -> None:
        report, champion = self.report, data.champion
        self.say("promote", f"promoting {info.version}")
        try:
            flipped = self.store.flip(
                info.version,
                expect=champion.version if champion else NO_POINTER,
                reason=f"train round {report.round_id}: {verdict.why}",
                by=CREATED_BY,
                metrics=verdict.published.evaluation.summary(),
                honour_pin=True,
            )
        except ConflictError as exc:
            now = self.store.current()
            report.pointer = now.version if now else None
            report.outcome = "not_promoted"
            report.reason = f"not promoted: pointer moved (now at {report.pointer}; {exc})"
            return
        except PinnedError as exc:
            report.outcome, report.reason = "not_promoted", f"not promoted: pinned ({exc})"
            return
        finally:
            self.clock.lap("promote_s")
        report.pointer = flipped.version
        report.outcome, report.reason = "promoted", f"promoted: {verdict.why}"


def _refusal(
    config: Config, data: _Data, baseline: VersionInfo | None, new: int, force: bool
) -> str:
    """Why the round must not train on ``data`` ('' when it may)."""
    bucket, labeled, holdout, champion = (
        config.train_bucket,
        data.labeled,
        data.holdout,
        data.champion,
    )
    if not len(holdout):
        return f"no holdout images under s3://{bucket}/{layout.HOLDOUT}/<class>/: nothing to judge a model by"
    if len(labeled.labels) < 2:
        return f"need labelled images of at least two classes under s3://{bucket}/{layout.LABELED}/<class>/"
    if baseline is not None and not force and new < config.train_min_new:
        since = f"{baseline.version}'s round"
        if champion is not None and baseline.version != champion.version:
            since += f" (the last round, which challenged {champion.version})"
        return (
            f"{new} labelled entries new or changed since {since}; "
            f"LENSFLOW_TRAIN_MIN_NEW is {config.train_min_new}"
        )
    total = len(labeled) + len(holdout)
    if total > config.train_max_images:
        return (
            f"{total} labelled and holdout images, over LENSFLOW_TRAIN_MAX_IMAGES "
            f"({config.train_max_images}), the most a round holds in the training Job's "
            "memory: raise the Job's memory limit and the setting together (docs/training.md)"
        )
    return ""


def _bucket_exists(s3, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise


def _changes(
    store: ModelStore, info: VersionInfo | None, entries: list[fp.Entry], total: int
) -> fp.Change:
    """What changed in the labelled set since ``info``'s round, by content. A version
    without a fingerprint (published by hand, or before fingerprints) is compared by count."""
    if info is None:
        return fp.Change(new=len(entries), removed=0)
    if fp.FILE in info.metadata.get("files", []):
        try:
            return fp.compare(entries, fp.from_bytes(store.read_file(info.version, fp.FILE)))
        except (NotFoundError, IntegrityError, ValueError) as exc:
            log.warning("%s: unreadable fingerprint, comparing by count: %s", info.version, exc)
    before = int((info.metadata.get("metrics") or {}).get("labeled_images", 0) or 0)
    return fp.Change(new=max(total - before, 0), removed=max(before - total, 0))


def _baseline(store: ModelStore, champion: VersionInfo | None) -> VersionInfo | None:
    """The round new data is counted from: the champion's, or a later round that challenged
    it and lost (so a losing challenger is not retrained on the same data every tick)."""
    parent = champion.version if champion else None
    for info in reversed(store.list_versions()):
        if champion is not None and info.version == champion.version:
            break
        if info.metadata.get("created_by") == CREATED_BY and info.metadata.get("parent") == parent:
            return info
    return champion


def _load_backbone(store: ModelStore, name: str) -> tuple[dict, dict]:
    """(weights, preprocessing) of the stored backbone ``name``."""
    import io

    from lensflow_train import backbone as B

    body, metadata = get_backbone(store, name)
    weights, _ = B.load_backbone_npz(io.BytesIO(body))
    return weights, metadata.get("preprocessing") or B.preprocessing()


def _champion(store: ModelStore, version: str) -> VersionInfo | None:
    try:
        return store.get_version(version)
    except NotFoundError:
        return None


def _input_size(info: VersionInfo | None) -> dataset.Size | None:
    """(height, width) a stored version takes, from its metadata."""
    try:
        spec = info.metadata["input"]  # type: ignore[union-attr]
        return int(spec["height"]), int(spec["width"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _warm_start(
    store: ModelStore, champion: VersionInfo | None, labels: list[str], keras_model, arch: str, M
) -> str | None:
    """Copy the champion's Keras weights when its architecture and labels match."""
    if champion is None:
        return None
    meta = champion.metadata
    if (meta.get("metrics") or {}).get("arch") != arch or champion.labels != labels:
        return None
    if M.WEIGHTS_FILE not in meta.get("files", []):
        return None
    try:
        M.load_weights(keras_model, store.read_file(champion.version, M.WEIGHTS_FILE))
    except (NotFoundError, IntegrityError, ValueError, OSError) as exc:
        log.warning("warm start from %s failed, training from scratch: %s", champion.version, exc)
        return None
    M.compile_model(keras_model, learning_rate=1e-3)  # fine-tune: smaller steps
    return f"warm start from {champion.version}"


def _evaluate_champion(
    store, champion: VersionInfo, judge: dataset.Pictures
) -> tuple[Evaluation | None, str | None]:
    """The champion's holdout metrics, or why it could not be evaluated."""
    spec = champion.metadata.get("input", {})
    size = _input_size(champion)
    if size is None:
        return None, f"champion {champion.version} has no input size in its metadata"
    try:
        model = store.read_file(champion.version, "model.tflite")
        return evaluate_pictures(
            model,
            champion.labels,
            judge.arrays[size],
            judge.classes,
            scale=float(spec.get("scale", DEFAULT_SCALE)),
            offset=float(spec.get("offset", DEFAULT_OFFSET)),
        ), None
    except (IntegrityError, InvalidModelError, ValueError, RuntimeError) as exc:
        return None, f"champion {champion.version} could not be evaluated: {exc}"


def _decide(
    config, chall: Evaluation, champion, champ: Evaluation | None, problem: str | None
) -> tuple[bool, str]:
    metric = config.train_metric
    score = getattr(chall, metric)
    if champion is None or champ is None:
        chance = 1 / max(1, len(chall.labels))
        usable = score >= chance + MIN_OVER_CHANCE
        first = "no champion yet" if champion is None else problem
        if usable:
            return (
                True,
                f"{first}; challenger {metric} {score:.3f} beats chance ({chance:.3f}) by {MIN_OVER_CHANCE}",
            )
        return (
            False,
            f"{first}, but challenger {metric} {score:.3f} is not usable (chance {chance:.3f})",
        )
    best = getattr(champ, metric)
    delta = score - best
    versus = f"{metric} {score:.4f} vs champion {champion.version} {best:.4f} (margin {config.train_margin})"
    if delta >= config.train_margin:
        return True, f"challenger better: {versus}"
    return False, f"challenger not better by the margin: {versus}"
