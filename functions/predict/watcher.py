"""Keeps a replica on the version the model pointer names, swapping live.

A background thread asks for the pointer every ``ttl / 2`` seconds with a conditional
GET (a 304 when nothing changed: no body moves). When it changed, the new version is
downloaded, its sha256 checked against the pointer and the metadata, loaded and warmed
beside the old one, and then swapped in with one reference assignment. Requests hold the
model they started with, so requests in flight finish on the old version.

A pointer to a missing, corrupt or mismatched model is refused: the replica keeps serving
what it has, logs why, and counts the refusal.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from functions.predict import metrics
from functions.predict.batcher import Batcher
from functions.predict.serving_model import ServingModel
from lensflow_core.runtime import InputSpec
from model_store import (
    ModelStore,
    ModelStoreError,
    NotFoundError,
    Pointer,
    StoreUnavailableError,
    parse_labels,
    sha256_hex,
)

log = logging.getLogger("lensflow.predict.watcher")


@dataclass
class WatcherStats:
    checks: int = 0
    swaps: int = 0
    refusals: int = 0
    store_errors: int = 0
    last_refusal: str | None = None
    last_error: str | None = None
    no_pointer_logged: bool = False
    refused: dict[str, str] = field(default_factory=dict)  # pointer etag -> reason


class ModelWatcher:
    def __init__(
        self,
        store: ModelStore,
        ttl_s: float,
        max_interpreters: int = 4,
        batcher: Batcher | None = None,
    ):
        self.store = store
        self.ttl_s = max(ttl_s, 0.05)
        self.max_interpreters = max_interpreters
        self.batcher = batcher
        self.stats = WatcherStats()
        self._model: ServingModel | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()

    @property
    def model(self) -> ServingModel | None:
        """The model to serve this request with (hold on to it for the whole request)."""
        return self._model

    def start(self) -> ModelWatcher:
        self.refresh()
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
                pointer = self.store.pointer.read_if_changed(self._etag)
            except NotFoundError:
                if not self.stats.no_pointer_logged:  # say it once, not every poll
                    log.warning("no model pointer yet: answering 503 until one is flipped")
                    self.stats.no_pointer_logged = True
                return
            except ModelStoreError as exc:
                self._store_error(exc)
                return
            if self.stats.last_error is not None:
                log.info("model store reachable again")
                self.stats.last_error = None
            if pointer is None or pointer.etag in self.stats.refused:
                return  # unchanged, or already refused
            current = self._model
            if current is not None and (current.version, current.sha256) == (
                pointer.version,
                pointer.sha256,
            ):
                self._etag = pointer.etag  # a pin or a re-flip: same model
                return
            try:
                candidate = self._load(pointer)
            except ModelStoreError as exc:
                if isinstance(exc, StoreUnavailableError):
                    self._store_error(exc)
                    return
                self._refuse(pointer, str(exc))
                return
            self._model = candidate
            self._etag = pointer.etag
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

    def _refuse(self, pointer: Pointer, reason: str) -> None:
        self.stats.refusals += 1
        metrics.MODEL_REFUSALS.inc()
        self.stats.last_refusal = f"{pointer.version}: {reason}"
        self.stats.refused[pointer.etag or ""] = reason
        serving = self._model.version if self._model else "nothing"
        log.error("refusing model %s (%s); still serving %s", pointer.version, reason, serving)

    def _store_error(self, exc: Exception) -> None:
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
        while not self._stop.wait(self.ttl_s / 2):
            try:
                self.refresh()
            except Exception:  # never let the watcher die
                log.exception("model watcher iteration failed")
