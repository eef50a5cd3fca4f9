"""A model version ready to serve: LiteRT interpreters, labels and input spec.

LiteRT interpreters are not thread-safe, so each request borrows one from a small pool
and returns it; no interpreter is ever used by two threads at once.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

from lensflow.preprocess import to_input


@dataclass(frozen=True)
class InputSpec:
    height: int
    width: int
    dtype: str
    scale: float
    offset: float

    @classmethod
    def from_metadata(cls, metadata: dict) -> InputSpec:
        spec = metadata["input"]
        return cls(
            int(spec["height"]),
            int(spec["width"]),
            str(spec.get("dtype", "float32")),
            float(spec.get("scale", 1 / 255)),
            float(spec.get("offset", 0.0)),
        )


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
    ):
        self.name = name
        self.version = version
        self.sha256 = sha256
        self.labels = labels
        self.spec = spec
        self._model = model
        self._idle: queue.SimpleQueue[Interpreter] = queue.SimpleQueue()
        self._created = 0
        self._max = max(1, max_interpreters)
        self._lock = threading.Lock()
        first = self._new_interpreter()
        # The same for every interpreter of this model: looked up once, not per request.
        self._input = first.get_input_details()[0]["index"]
        self._output = first.get_output_details()[0]
        outputs = int(np.prod(self._output["shape"][1:]))
        if outputs != len(labels):
            raise ValueError(f"{len(labels)} labels for a model with {outputs} outputs")
        self._idle.put(first)

    @property
    def identity(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def warm(self) -> None:
        """One inference on a blank image, so the first real request pays no set-up."""
        blank = Image.new("RGB", (self.spec.width, self.spec.height))
        self.predict(blank, top_k=1)

    def predict(self, image: Image.Image, top_k: int = 3) -> list[dict[str, float | str]]:
        batch = self.tensor(image)
        scores = self.invoke(batch)
        order = np.argsort(scores)[::-1][:top_k]
        return [{"label": self.labels[i], "score": round(float(scores[i]), 6)} for i in order]

    def tensor(self, image: Image.Image) -> np.ndarray:
        if self.spec.dtype == "uint8":
            resized = image.resize((self.spec.width, self.spec.height), Image.BILINEAR)
            return np.asarray(resized, dtype=np.uint8)[np.newaxis, ...]
        return to_input(image, self.spec.height, self.spec.width, self.spec.scale, self.spec.offset)

    def invoke(self, batch: np.ndarray) -> np.ndarray:
        interpreter = self._borrow()
        try:
            interpreter.set_tensor(self._input, batch)
            interpreter.invoke()
            scores = interpreter.get_tensor(self._output["index"]).reshape(-1).astype(np.float32)
        finally:
            self._idle.put(interpreter)
        if self._output["dtype"] == np.uint8:  # quantized output: dequantize
            scale, zero = self._output["quantization"]
            scores = (scores - zero) * scale
        return scores

    def _borrow(self) -> Interpreter:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._created < self._max:
                return self._new_interpreter()
        return self._idle.get()

    def _new_interpreter(self) -> Interpreter:
        interpreter = Interpreter(model_content=self._model, num_threads=1)
        interpreter.allocate_tensors()
        self._created += 1
        return interpreter
