"""The one LiteRT runtime: how lensflow loads, feeds and reads a ``.tflite`` classifier.

Used to validate a model before it is stored (``describe``), to serve it (the predict
function) and to score it on the holdout (the train function), so the three can never
disagree about pixels or numbers. numpy, Pillow and LiteRT only: never TensorFlow.

- Input: the picture resized (bilinear) to the model's input, then ``pixels * scale +
  offset`` (``InputSpec``, from the version's metadata). A quantized input (uint8/int8)
  gets those values quantized with the tensor's own scale and zero point; a float16
  input gets them cast.
- Output: scores as float32; a quantized output is dequantized the same way.
- LiteRT interpreters are not thread-safe: a ``LiteModel`` lends each call an
  interpreter of its own from a small pool, so ``scores`` is safe from many threads.
- Batches: ``scores_batch`` runs n pictures as one invoke when the model's batch
  dimension can be resized (its signature says -1); each pooled slot keeps one
  interpreter per batch size it has seen. A model whose batch cannot be resized is run
  one picture at a time, with the same results.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

DEFAULT_SCALE = 1 / 255
DEFAULT_OFFSET = 0.0
_QUANTIZED = (np.uint8, np.int8)
_IDENTITY = np.arange(256, dtype=np.uint8)  # a uint8 input that takes the pixels unchanged


class ModelError(ValueError):
    """The bytes are not a single-input image classifier that LiteRT can run."""


@dataclass(frozen=True)
class InputSpec:
    height: int
    width: int
    dtype: str = "float32"
    scale: float = DEFAULT_SCALE
    offset: float = DEFAULT_OFFSET

    @classmethod
    def from_metadata(cls, metadata: dict) -> InputSpec:
        spec = metadata["input"]
        return cls(
            int(spec["height"]),
            int(spec["width"]),
            str(spec.get("dtype", "float32")),
            float(spec.get("scale", DEFAULT_SCALE)),
            float(spec.get("offset", DEFAULT_OFFSET)),
        )


def resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """``image`` as RGB of the model's input size (bilinear): the pixels every model sees."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return image


def to_input(
    image: Image.Image,
    height: int,
    width: int,
    scale: float = DEFAULT_SCALE,
    offset: float = DEFAULT_OFFSET,
) -> np.ndarray:
    """``image`` as a float32 batch of one, shape ``[1, height, width, 3]``.

    RGB, resized (bilinear) to the model's input, then ``pixels * scale + offset``.
    """
    pixels = np.asarray(resize(image, height, width), dtype=np.float32)
    return (pixels * np.float32(scale) + np.float32(offset))[np.newaxis, ...]


def pixels(image: Image.Image, height: int, width: int) -> np.ndarray:
    """``image`` as uint8 RGB ``[height, width, 3]`` of the model's input size."""
    return np.asarray(resize(image, height, width), dtype=np.uint8)


def quantize(values: np.ndarray, dtype, quantization: tuple[float, int]) -> np.ndarray:
    """Real ``values`` as the integers a quantized tensor holds (round, clip)."""
    scale, zero = quantization
    info = np.iinfo(dtype)
    return np.clip(np.rint(values / scale + zero), info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, quantization: tuple[float, int]) -> np.ndarray:
    scale, zero = quantization
    values = values.astype(np.float32)
    return (values - zero) * np.float32(scale) if scale else values


def _interpreter(model: bytes, num_threads: int) -> Interpreter:
    interpreter = Interpreter(model_content=model, num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


_FEEDABLE = ("float32", "float16", "uint8", "int8")


def _check_feedable(which: str, details: dict) -> None:
    """Raise ``ModelError`` unless the runtime can write (input) or read (output) this
    tensor: a float type, or uint8/int8 with one positive scale for the whole tensor."""
    dtype = np.dtype(details["dtype"]).name
    if dtype not in _FEEDABLE:
        raise ModelError(
            f"{which} type {dtype} is not one the runtime can feed ({', '.join(_FEEDABLE)})"
        )
    if dtype not in ("uint8", "int8"):
        return
    scales = details.get("quantization_parameters", {}).get("scales", np.zeros(0))
    if len(scales) > 1:
        raise ModelError(
            f"{which} is quantized per channel ({len(scales)} scales); "
            "the runtime handles one scale and zero point per tensor"
        )
    scale = float(scales[0]) if len(scales) else float(details["quantization"][0])
    if not scale > 0:
        raise ModelError(
            f"{which} is {dtype} without a quantization scale: "
            "the runtime cannot tell which real values its integers stand for"
        )


def describe(model: bytes) -> dict:
    """Load ``model`` in LiteRT, run it once on zeros, and describe its input and output.

    Raises ``ModelError`` when it does not load, is not a single-input image classifier,
    takes or gives a tensor the runtime cannot feed or read (``_check_feedable``), or
    does not run.
    """
    try:
        interpreter = _interpreter(model, 1)
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"expected one input and one output, found {len(inputs)} and {len(outputs)}"
            )
        shape = [int(d) for d in inputs[0]["shape"]]
        if len(shape) != 4 or shape[3] not in (1, 3):
            raise ModelError(f"input shape {shape} is not [1, height, width, 1|3]")
        _check_feedable("input", inputs[0])
        _check_feedable("output", outputs[0])
        interpreter.set_tensor(inputs[0]["index"], np.zeros(shape, dtype=inputs[0]["dtype"]))
        interpreter.invoke()
        out = interpreter.get_tensor(outputs[0]["index"])
    except ModelError:
        raise
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError for bad flatbuffers
        raise ModelError(f"model does not load in LiteRT: {exc}") from None
    return {
        "input_shape": shape,
        "input_dtype": np.dtype(inputs[0]["dtype"]).name,
        "output_size": int(np.prod(out.shape[1:])) if out.ndim > 1 else int(out.size),
        "output_dtype": np.dtype(outputs[0]["dtype"]).name,
    }


class _Slot:
    """One pooled unit of inference: an interpreter per batch size it has run."""

    def __init__(self, first: Interpreter):
        self.by_batch: dict[int, Interpreter] = {1: first}


class LiteModel:
    """One loaded ``.tflite`` classifier: image in, float32 scores out.

    ``spec`` gives the normalisation (and the size, which must be the model's); without
    it the size comes from the model and the normalisation is ``scale`` and ``offset``. Up to
    ``max_interpreters`` slots (interpreters) are made on demand, ``num_threads`` each: at
    most that many invokes run at once.
    """

    def __init__(
        self,
        model: bytes,
        spec: InputSpec | None = None,
        *,
        scale: float = DEFAULT_SCALE,
        offset: float = DEFAULT_OFFSET,
        max_interpreters: int = 1,
        num_threads: int = 1,
    ):
        self._model = model
        self._num_threads = num_threads
        self._idle: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._max = max(1, max_interpreters)
        self._lock = threading.Lock()
        self.created = 0
        first = self._new_interpreter()
        # The same for every interpreter of this model: looked up once, not per call.
        self._input = first.get_input_details()[0]
        self._output = first.get_output_details()[0]
        _check_feedable("input", self._input)
        _check_feedable("output", self._output)
        _, height, width, _ = (int(d) for d in self._input["shape"])
        dtype = np.dtype(self._input["dtype"]).name
        self.spec = spec or InputSpec(height, width, dtype, scale, offset)
        self.outputs = int(np.prod(self._output["shape"][1:]))
        # A quantized input takes each 8-bit pixel value to one integer: a 256-entry
        # table does the normalisation and quantization at once (the same numbers).
        self._table = None
        if self._input["dtype"] in _QUANTIZED:
            levels = np.arange(256, dtype=np.float32)
            levels = levels * np.float32(self.spec.scale) + np.float32(self.spec.offset)
            self._table = quantize(levels, self._input["dtype"], self._input["quantization"])
            if np.array_equal(self._table, np.arange(256)) and self._table.dtype == np.uint8:
                self._table = _IDENTITY  # pixels / 255 into scale 1/255: the pixels as they are
        # -1: the converter left the batch dimension free, so it can be resized.
        signature = self._input.get("shape_signature", self._input["shape"])
        self.batchable = len(signature) > 0 and int(signature[0]) == -1
        self._idle.put(_Slot(first))

    def tensor(self, image: Image.Image) -> np.ndarray:
        """``image`` as this model's input: a batch of one in the input tensor's dtype."""
        if self._table is _IDENTITY:  # a lookup that changes nothing costs ~0.3 ms
            return pixels(image, self.spec.height, self.spec.width)[np.newaxis]
        if self._table is not None:
            return self._table[pixels(image, self.spec.height, self.spec.width)][np.newaxis]
        values = to_input(
            image, self.spec.height, self.spec.width, self.spec.scale, self.spec.offset
        )
        return values.astype(self._input["dtype"], copy=False)

    def scores(self, batch: np.ndarray) -> np.ndarray:
        """float32 scores, one per output, for a batch of one made by ``tensor``."""
        return self.scores_batch(batch)[0]

    def scores_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 scores ``[n, outputs]`` for ``n`` pictures made by ``tensor`` and stacked
        (``np.concatenate``): one invoke when the model is batchable, else n invokes."""
        n = len(batch)
        slot = self._borrow()
        try:
            interpreter = self._for_batch(slot, n) if n > 1 else slot.by_batch[1]
            if interpreter is None:  # the batch cannot be resized: one at a time
                raw = np.concatenate([self._invoke(slot.by_batch[1], b[None]) for b in batch])
            else:
                raw = self._invoke(interpreter, batch)
        finally:
            self._idle.put(slot)
        if self._output["dtype"] in _QUANTIZED:
            return dequantize(raw, self._output["quantization"])
        return raw.astype(np.float32)

    def classify(self, image: Image.Image) -> np.ndarray:
        return self.scores(self.tensor(image))

    def _invoke(self, interpreter: Interpreter, batch: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(self._input["index"], batch)
        interpreter.invoke()
        return interpreter.get_tensor(self._output["index"]).reshape(len(batch), -1)

    def _for_batch(self, slot: _Slot, n: int) -> Interpreter | None:
        """The slot's interpreter for batches of ``n``, made on first use; None when the
        model cannot run batches (then it is never tried again)."""
        if not self.batchable:
            return None
        interpreter = slot.by_batch.get(n)
        if interpreter is not None:
            return interpreter
        try:
            interpreter = Interpreter(model_content=self._model, num_threads=self._num_threads)
            shape = [n, *(int(d) for d in self._input["shape"][1:])]
            interpreter.resize_tensor_input(self._input["index"], shape, strict=True)
            interpreter.allocate_tensors()
            out = interpreter.get_output_details()[0]["shape"]
            if int(np.prod(out)) != n * self.outputs or int(out[0]) != n:
                raise ValueError(f"output shape {list(out)} for a batch of {n}")
        except (ValueError, RuntimeError):  # a fixed reshape inside the graph, for one
            self.batchable = False
            return None
        slot.by_batch[n] = interpreter
        return interpreter

    def _borrow(self) -> _Slot:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self.created < self._max:
                return _Slot(self._new_interpreter())
        return self._idle.get()

    def _new_interpreter(self) -> Interpreter:
        interpreter = _interpreter(self._model, self._num_threads)
        self.created += 1
        return interpreter
