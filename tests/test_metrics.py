"""Metrics against an independent per-class computation (loops over pixels and classes), on random
and edge-case inputs, and SED's post-processing (sigmoid, bilinear, argmax) with class chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpseg.metrics import (
    confusion_matrix,
    label_range_error,
    predict_labels,
    segmentation_scores,
    uniform_random_miou,
)


def reference_scores(pred: np.ndarray, label: np.ndarray, n: int, ignore: int) -> dict:
    """Straight from the definitions, class by class, with boolean masks (no confusion matrix)."""
    valid = label != ignore
    ious, accs, weights = {}, {}, {}
    for c in range(n):
        gt, pr = (label == c) & valid, (pred == c) & valid
        if gt.sum() == 0:
            continue
        ious[c] = (gt & pr).sum() / (gt | pr).sum()
        accs[c] = (gt & pr).sum() / gt.sum()
        weights[c] = gt.sum() / valid.sum()
    return {
        "miou": 100 * np.mean(list(ious.values())),
        "macc": 100 * np.mean(list(accs.values())),
        "fwiou": 100 * sum(weights[c] * ious[c] for c in ious),
        "pacc": 100 * ((pred == label) & valid).sum() / valid.sum(),
        "iou": ious,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_an_independent_computation_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    n, ignore = 7, 255
    label = rng.integers(0, n, size=(3, 37, 41))
    label[rng.random(label.shape) < 0.2] = ignore
    label[label == 3] = 5  # class 3 absent from the ground truth ...
    pred = rng.integers(0, n, size=label.shape)  # ... but predicted: it lowers others' IoU only
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), n, ignore)
    assert conf.sum() == (label != ignore).sum()
    got, want = segmentation_scores(conf), reference_scores(pred, label, n, ignore)
    for key in ("miou", "macc", "fwiou", "pacc"):
        assert got[key] == pytest.approx(want[key], rel=1e-12)
    assert got["per_class_iou"][3] is None and got["classes_present"] == n - 1
    for c, iou in want["iou"].items():
        assert got["per_class_iou"][c] == pytest.approx(100 * iou)


def test_uint16_labels_with_65535_ignore_and_many_classes():
    rng = np.random.default_rng(3)
    n, ignore = 847, 65535
    label = rng.integers(0, n, size=(64, 64)).astype(np.uint16)
    label[:8] = ignore
    pred = label.astype(np.int64).copy()
    pred[8:16] = (pred[8:16] + 1) % n
    conf = confusion_matrix(pred, label, n, ignore)
    got, want = segmentation_scores(conf), reference_scores(pred, label.astype(np.int64), n, ignore)
    assert got["miou"] == pytest.approx(want["miou"]) and got["pacc"] == pytest.approx(want["pacc"])
    assert conf.sum() == 56 * 64


def test_all_ignore_image_adds_nothing_and_empty_totals_give_none():
    label = np.full((5, 5), 255)
    conf = confusion_matrix(np.zeros((5, 5), np.int64), label, 3, 255)
    assert conf.sum() == 0
    scores = segmentation_scores(conf)
    assert scores["miou"] is None and scores["pacc"] is None and scores["per_class_iou"] == [None] * 3
    assert uniform_random_miou(conf.sum(axis=1)) is None


def test_perfect_prediction_scores_100():
    label = np.array([[0, 0, 2], [2, 255, 1]])
    scores = segmentation_scores(confusion_matrix(np.where(label == 255, 0, label), label, 4, 255))
    assert scores["miou"] == scores["pacc"] == scores["fwiou"] == 100.0
    assert scores["per_class_iou"][3] is None


def test_label_range_error_lists_values_that_are_neither_ids_nor_ignore():
    label = np.array([[0, 1, 255], [7, 9, -1]])
    assert label_range_error(label, 5, 255) == [-1, 7, 9]
    assert label_range_error(np.array([[0, 4, 255]]), 5, 255) == []


def test_uniform_random_miou_matches_simulation():
    rng = np.random.default_rng(0)
    n = 5
    label = rng.choice(n, size=200_000, p=[0.5, 0.2, 0.2, 0.1, 0.0])
    pred = rng.integers(0, n, size=label.shape)
    simulated = segmentation_scores(confusion_matrix(pred, label, n, 255))["miou"]
    expected = uniform_random_miou(np.bincount(label, minlength=n))
    assert expected == pytest.approx(simulated, abs=0.3)


@pytest.mark.parametrize("chunk", [None, 1, 3, 4])
def test_predict_labels_equals_sigmoid_upsample_argmax_for_any_chunk(chunk):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 5, 6)
    want = torch.nn.functional.interpolate(
        logits.sigmoid(), size=(17, 23), mode="bilinear", align_corners=False
    ).argmax(dim=1)
    got = predict_labels(logits, (17, 23), class_chunk=chunk)
    assert got.shape == (2, 17, 23) and torch.equal(got, want)
