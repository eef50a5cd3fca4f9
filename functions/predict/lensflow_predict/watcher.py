"""Keeps a replica on the version the model pointer names, swapping live.

A background thread asks for the pointer every ``ttl / 2`` seconds with a conditional
GET (a 304 when nothing changed: no body moves). When it changed, the new version is
downloaded, its sha256 checked against the pointer and the metadata, loaded and warmed
beside the old one, and then swapped in with one reference assignment. Requests hold the
model they started with, so requests in flight finish on the old version.

A pointer to a missing, corrupt or mismatched model is refused: the replica keeps serving
what it has, logs why, and counts the refusal. A refused version is tried again on a
backoff (``RETRY_REFUSED_S``, doubling up to ``RETRY_REFUSED_MAX_S``), so restoring the
object heals the replica without another flip.

Readiness (``ready()``): ready once the replica serves the version the pointer names, or
has read the store and found no pointer yet; not ready before the first pointer read,
while the store cannot be read, or while the pointer names a version it refused.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from lensflow_core.runtime import InputSpec
from lensflow_model_store import (
    ModelStore,
    ModelStoreError,
    NotFoundError,
    Pointer,
    PointerFile,
    StoreUnavailableError,
    parse_labels,
    sha256_hex,
)
from lensflow_predict import metrics
from lensflow_predict.batcher import Batcher
from lensflow_predict.serving_model import ServingModel

log = logging.getLogger("lensflow.predict.watcher")

RETRY_REFUSED_S = 2.0
RETRY_REFUSED_MAX_S = 60.0


@dataclass
class Refusal:
    """A pointer (by ETag) whose version would not load, and when to try it again."""

    reason: str
    delay_s: float = RETRY_REFUSED_S
    retry_at: float = field(default_factory=lambda: time.monotonic() + RETRY_REFUSED_S)


@dataclass
class WatcherStats:
    checks: int = 0
    swaps: int = 0
    refusals: int = 0
    store_errors: int = 0
    last_refusal: str | None = None
    last_error: str | None = None
    no_pointer_logged: bool = False
    refusal_retries: int = 0
    refused: dict[str, Refusal] = field(default_factory=dict)  # pointer etag -> refusal


class ModelWatcher:
    def __init__(
        self,
        store: ModelStore,
        ttl_s: float,
        max_interpreters: int = 4,
        batcher: Batcher | None = None,
        pointer: PointerFile | None = None,
    ):
        self.store = store
        # what the pointer is read through, twice a TTL (the replica passes a libcurl one)
        self.pointer = pointer or store.pointer
        self.ttl_s = max(ttl_s, 0.05)
        self.max_interpreters = max_interpreters
        self.batcher = batcher
        self.stats = WatcherStats()
        self._model: ServingModel | None = None
        self._etag: str | None = None
        # What the last pointer read said: None before the first successful read,
        # "none" when there is no pointer, else the pointer (set once acted upon).
        self._target: Pointer | str | None = None
        self._store_ok = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()

    @property
    def model(self) -> ServingModel | None:
        """The model to serve this request with (hold on to it for the whole request)."""
        return self._model

    def ready(self) -> tuple[bool, dict]:
        """(ready, what to say about it): see the module docstring."""
        model = self._model
        serving = model.identity if model else None
        target = self._target
        if not self._store_ok:
            reason = self.stats.last_error or "the model pointer was not read yet"
            return False, {"ready": False, "model": serving, "reason": reason}
        if target == "none":
            return True, {
                "ready": True,
                "model": serving,
                "pointer": None,
                "reason": "no model pointer yet",
            }
        if (
            model is not None
            and isinstance(target, Pointer)
            and (model.version, model.sha256) == (target.version, target.sha256)
        ):
            return True, {"ready": True, "model": serving}
        if isinstance(target, Pointer) and target.etag in self.stats.refused:
            refusal = self.stats.refused[target.etag]
            reason = f"the pointer names {target.version}, refused: {refusal.reason}"
        else:
            reason = "loading the version the pointer names"
        return False, {"ready": False, "model": serving, "reason": reason}

    def start(self) -> ModelWatcher:
        """Watch in a background thread; the first check runs there at once, so that a
        replica answers (``/metrics``, a 503 readiness) even while the store is away."""
        self._thread = threading.Thread(target=self._loop, name="model-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def refresh(self) -> None:
        """Check the pointer once and swap if it names a new, sound version."""
        with self._refresh_lock:
            self.stats.checks += 1
            try:
                pointer = self.pointer.read_if_changed(self._etag)
            except NotFoundError:
                self._reachable()
                self._target = "none"
                if not self.stats.no_pointer_logged:  # say it once, not every poll
                    log.warning("no model pointer yet: answering 503 until one is flipped")
                    self.stats.no_pointer_logged = True
                return
            except ModelStoreError as exc:
                self._store_error(exc)
                return
            self._reachable()
            if pointer is None:
                return  # unchanged
            refusal = self.stats.refused.get(pointer.etag or "")
            if refusal is not None and time.monotonic() < refusal.retry_at:
                self._target = pointer
                return  # refused; not time to try again yet
            current = self._model
            if current is not None and (current.version, current.sha256) == (
                pointer.version,
                pointer.sha256,
            ):
                self._etag = pointer.etag  # a pin or a re-flip: same model
                self._target = pointer
                return
            try:
                candidate = self._load(pointer)
            except ModelStoreError as exc:
                if isinstance(exc, StoreUnavailableError):
                    self._store_error(exc)
                    return
                self._refuse(pointer, str(exc), refusal)
                self._target = pointer
                return
            if refusal is not None:
                log.info("model %s loads now: refusal lifted", pointer.version)
                del self.stats.refused[pointer.etag or ""]
            self._model = candidate
            self._etag = pointer.etag
            self._target = pointer
            self.stats.swaps += 1
            metrics.MODEL_SWAPS.inc()
            metrics.serving(candidate.name, candidate.version, candidate.sha256)
            self.stats.last_error = None
            log.info(
                "serving %s %s (sha256 %s)",
                candidate.name,
                candidate.version,
                candidate.sha256[:12],
            )

    def _load(self, pointer: Pointer) -> ServingModel:
        info = self.store.get_version(pointer.version)
        if info.sha256 != pointer.sha256:
            raise ModelStoreError(
                f"pointer sha256 {pointer.sha256[:12]} differs from {pointer.version}'s "
                f"metadata {info.sha256[:12]}"
            )
        model_bytes = self.store.read_file(pointer.version, "model.tflite")  # digest-checked
        if sha256_hex(model_bytes) != pointer.sha256:
            raise ModelStoreError(f"{pointer.version}/model.tflite does not match the pointer")
        labels = parse_labels(self.store.read_file(pointer.version, "labels.txt").decode())
        try:
            model = ServingModel(
                self.store.name,
                pointer.version,
                pointer.sha256,
                model_bytes,
                labels,
                InputSpec.from_metadata(info.metadata),
                self.max_interpreters,
                self.batcher,
            )
            model.warm()
        except (ValueError, RuntimeError, KeyError, IndexError) as exc:
            raise ModelStoreError(f"{pointer.version} does not load or run: {exc}") from None
        return model

    def _refuse(self, pointer: Pointer, reason: str, previous: Refusal | None) -> None:
        self.stats.last_refusal = f"{pointer.version}: {reason}"
        if previous is not None:  # tried again, still bad: wait longer next time
            self.stats.refusal_retries += 1
            previous.reason = reason
            previous.delay_s = min(previous.delay_s * 2, RETRY_REFUSED_MAX_S)
            previous.retry_at = time.monotonic() + previous.delay_s
            return
        self.stats.refusals += 1
        metrics.MODEL_REFUSALS.inc()
        self.stats.refused[pointer.etag or ""] = Refusal(reason)
        serving = self._model.version if self._model else "nothing"
        log.error(
            "refusing model %s (%s); still serving %s; trying again in %g s",
            pointer.version,
            reason,
            serving,
            RETRY_REFUSED_S,
        )

    def _reachable(self) -> None:
        self._store_ok = True
        if self.stats.last_error is not None:
            log.info("model store reachable again")
            self.stats.last_error = None

    def _store_error(self, exc: Exception) -> None:
        self._store_ok = False
        first_of_outage = self.stats.last_error is None
        self.stats.store_errors += 1
        metrics.STORE_ERRORS.inc()
        self.stats.last_error = str(exc)
        # once per outage at warning level; every poll would flood the log
        log.log(
            logging.WARNING if first_of_outage else logging.DEBUG,
            "model pointer check failed (serving what it has): %s",
            exc,
        )

    def _loop(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self.ttl_s / 2
            try:
                self.refresh()
            except Exception:  # never let the watcher die
                log.exception("model watcher iteration failed")
