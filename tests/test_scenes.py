"""Synthetic aerial scenes: deterministic, every class, any size, fast."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from lensflow import scenes


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


@pytest.mark.parametrize("cls", scenes.CLASSES)
def test_same_arguments_same_pixels(cls):
    a, b = scenes.render_scene(cls, 7), scenes.render_scene(cls, 7)
    assert a.mode == "RGB" and a.size == scenes.DEFAULT_SIZE
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(scenes.render_scene(cls, 8)))


def test_jpeg_is_deterministic_and_decodes():
    data = scenes.scene_jpeg("road", 3, (640, 480), quality=85)
    assert data == scenes.scene_jpeg("road", 3, (640, 480), quality=85)
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.size == (640, 480)


def test_unknown_class_is_refused():
    with pytest.raises(ValueError, match="unknown scene class"):
        scenes.render_scene("volcano", 1)


def test_labelled_set_covers_every_class_and_seeds_are_disjoint():
    train = scenes.labelled_set(3, seed=1)
    holdout = scenes.labelled_set(3, seed=2)
    assert [c for c, _ in train].count("forest") == 3
    assert {c for c, _ in train} == set(scenes.CLASSES)
    assert len(train) == 3 * len(scenes.CLASSES)
    assert not {b for _, b in train} & {b for _, b in holdout}


def mean_look(cls: str, seeds: range) -> np.ndarray:
    """A class's average colour and texture: per-channel mean and spread over ``seeds``."""
    looks = [np.asarray(scenes.render_scene(cls, s, (64, 64)), dtype=float) for s in seeds]
    return np.mean([np.concatenate([a.mean(axis=(0, 1)), a.std(axis=(0, 1))]) for a in looks], 0)


def test_every_class_has_a_look_of_its_own():
    """The average look of ten new scenes of a class is nearest that class's average look:
    no two classes look alike on average (a classifier has something to learn)."""
    known = {c: mean_look(c, range(10)) for c in scenes.CLASSES}
    for cls in scenes.CLASSES:
        fresh = mean_look(cls, range(10, 20))
        nearest = min(known, key=lambda c: np.linalg.norm(fresh - known[c]))
        assert nearest == cls


def test_small_scenes_are_fast():
    start = time.perf_counter()
    for s in range(20):
        for cls in scenes.CLASSES:
            scenes.render_scene(cls, s)
    per_image = (time.perf_counter() - start) / (20 * len(scenes.CLASSES))
    assert per_image < 0.02  # ~1-3 ms on a laptop; generous for loaded CI machines


def test_twelve_megapixel_photo():
    start = time.perf_counter()
    img = scenes.render_scene("solar_farm", 1, (4000, 3000))
    assert img.size == (4000, 3000)
    assert time.perf_counter() - start < 5.0
