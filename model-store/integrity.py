"""Digests and the check that a model really loads before anyone can point at it."""

from __future__ import annotations

import hashlib

import numpy as np

from model_store.errors import InvalidModelError


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inspect_model(model: bytes) -> dict:
    """Load ``model`` in LiteRT, run it once on zeros, and describe its input and output.

    Raises InvalidModelError when it does not load, is not a single-input image
    classifier, or does not run.
    """
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_content=model, num_threads=1)
        interpreter.allocate_tensors()
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise InvalidModelError(
                f"expected one input and one output, found {len(inputs)} and {len(outputs)}"
            )
        shape = [int(d) for d in inputs[0]["shape"]]
        if len(shape) != 4 or shape[3] not in (1, 3):
            raise InvalidModelError(f"input shape {shape} is not [1, height, width, 1|3]")
        interpreter.set_tensor(inputs[0]["index"], np.zeros(shape, dtype=inputs[0]["dtype"]))
        interpreter.invoke()
        out = interpreter.get_tensor(outputs[0]["index"])
    except InvalidModelError:
        raise
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError for bad flatbuffers
        raise InvalidModelError(f"model does not load in LiteRT: {exc}") from None
    return {
        "input_shape": shape,
        "input_dtype": np.dtype(inputs[0]["dtype"]).name,
        "output_size": int(np.prod(out.shape[1:])) if out.ndim > 1 else int(out.size),
        "output_dtype": np.dtype(outputs[0]["dtype"]).name,
    }


def check_labels(labels: list[str], output_size: int) -> None:
    if not labels:
        raise InvalidModelError("no labels")
    if any(not label.strip() or "\n" in label for label in labels):
        raise InvalidModelError("labels must be non-empty single lines")
    if len(set(labels)) != len(labels):
        raise InvalidModelError("labels are not unique")
    if len(labels) != output_size:
        raise InvalidModelError(f"{len(labels)} labels for a model with {output_size} outputs")


def parse_labels(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
