"""The orders `bench learning` compares (bench/sampling.py): the labelling queue's rule and
its two parts alone."""

from __future__ import annotations

import numpy as np

from bench.sampling import labels_to_reach, queue_order

LABELS = ["a", "b", "c"]
# top-1 and margin of each row: 0.90 0.85 | 0.50 0.10 | 0.40 0.05 | 0.70 0.50 | 0.55 0.30
P = np.array(
    [
        [0.90, 0.05, 0.05],
        [0.50, 0.40, 0.10],
        [0.40, 0.35, 0.25],
        [0.70, 0.20, 0.10],
        [0.55, 0.25, 0.20],
    ]
)


def test_the_queue_rule_offers_uncertain_photos_first_smallest_margin_first():
    assert queue_order(P, LABELS) == [2, 1, 4, 3, 0]
    assert queue_order(P, LABELS, "margin") == [2, 1, 4, 3, 0]
    assert queue_order(P, LABELS, "top1") == [2, 1, 4, 3, 0]


def test_the_rule_and_its_parts_differ_where_top1_and_margin_disagree():
    p = np.array(
        [
            [0.59, 0.29, 0.12],  # top-1 0.59 (uncertain), margin 0.30
            [0.61, 0.38, 0.01],  # top-1 0.61, margin 0.23: certain by both defaults
            [0.52, 0.47, 0.01],  # top-1 0.52, margin 0.05
            [0.40, 0.30, 0.30],  # top-1 0.40, margin 0.10
        ]
    )
    assert queue_order(p, LABELS) == [2, 3, 0, 1]  # uncertain first, then by margin
    assert queue_order(p, LABELS, "margin") == [2, 3, 1, 0]
    assert queue_order(p, LABELS, "top1") == [3, 2, 0, 1]


def test_labels_to_reach_interpolates_and_says_never():
    curve = {1: 0.5, 2: 0.7, 3: 0.9}
    assert labels_to_reach(curve, 0.8) == 2.5
    assert labels_to_reach(curve, 0.95) is None
