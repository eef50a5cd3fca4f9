"""A model version ready to serve: its identity, labels and the shared LiteRT runtime.

Inference itself is ``lensflow_core.runtime.LiteModel`` (the same code that validates and
evaluates models), directly or through the replica's ``Batcher``; this adds what a
prediction event names: model, version, digest, labels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from lensflow_core.runtime import InputSpec, LiteModel
from lensflow_predict.batcher import Batcher


class ServingModel:
    """One loaded version. ``predict`` is safe to call from many threads."""

    def __init__(
        self,
        name: str,
        version: str,
        sha256: str,
        model: bytes,
        labels: list[str],
        spec: InputSpec,
        max_interpreters: int = 4,
        batcher: Batcher | None = None,
    ):
        self.name = name
        self.version = version
        self.sha256 = sha256
        self.labels = labels
        self.spec = spec
        self.batcher = batcher
        self.runtime = LiteModel(model, spec, max_interpreters=max_interpreters)
        if self.runtime.outputs != len(labels):
            raise ValueError(
                f"{len(labels)} labels for a model with {self.runtime.outputs} outputs"
            )

    @property
    def identity(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def warm(self) -> None:
        """One inference on a blank image, so the first real request pays no set-up."""
        self.predict(Image.new("RGB", (self.spec.width, self.spec.height)), top_k=1)

    def predict(self, image: Image.Image, top_k: int = 3) -> list[dict[str, float | str]]:
        tensor = self.runtime.tensor(image)
        if self.batcher is None:
            scores = self.runtime.scores(tensor)
        else:
            scores = self.batcher.scores(self.runtime, tensor)
        order = np.argsort(scores)[::-1][:top_k]
        return [{"label": self.labels[i], "score": round(float(scores[i]), 6)} for i in order]
