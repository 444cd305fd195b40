"""The digits classifier: labels aligned with the data split, the shipped weights, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calibexport.calibration_tables.data import load_digits
from calibexport.errors import CalibexportError
from calibexport.evaluation.classifier import (
    DEFAULT_CLASSIFIER,
    FEATURE_DIM,
    accuracy,
    classifier_features,
    digits_labels,
    load_classifier,
    save_classifier,
    train_classifier,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / DEFAULT_CLASSIFIER


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_labels_follow_the_split():
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    images = load_digits("test", resolution=8)
    labels = digits_labels("test")
    assert len(labels) == len(images) == 180
    # Each held-out image at 8x8 is the sklearn image scaled to [-1, 1]; find it by value.
    scaled = raw.images.astype(np.float32) / 16.0 * 2.0 - 1.0
    for image, label in zip(images[:20], labels[:20]):
        index = int(np.argmin(np.abs(scaled - image[0]).reshape(len(scaled), -1).sum(axis=1)))
        assert raw.target[index] == label
    assert len(digits_labels("train")) == 1617
    assert len(digits_labels("all")) == 1797


def test_shipped_classifier_matches_its_record():
    record = json.loads(SHIPPED.with_suffix(".json").read_text())
    module = load_classifier(SHIPPED)
    measured = accuracy(module, load_digits("test", 16), digits_labels("test"))
    assert measured == pytest.approx(record["test_accuracy"], abs=1e-4)
    assert measured > 0.95
    assert SHIPPED.stat().st_size < 1_000_000


def test_features_are_penultimate_layer():
    module = load_classifier(SHIPPED)
    images = load_digits("test", 16)[:7]
    features = classifier_features(module, images, batch_size=3)
    assert features.shape == (7, FEATURE_DIM)
    assert features.dtype == np.float64
    assert np.all(features >= 0)
    logits = module.logits(torch.from_numpy(features).float())
    np.testing.assert_allclose(logits.detach().numpy(),
                               module(torch.from_numpy(images)).detach().numpy(), atol=1e-4)


@pytest.mark.slow
def test_train_save_load_roundtrip(tmp_path):
    images, labels = load_digits("train", 16)[:256], digits_labels("train")[:256]
    module = train_classifier(images, labels, epochs=6, batch_size=32, seed=0)
    assert accuracy(module, images, labels) > 0.5
    path = tmp_path / "classifier.safetensors"
    save_classifier(module, path, {"test_accuracy": 0.5})
    loaded = load_classifier(path)
    np.testing.assert_array_equal(classifier_features(loaded, images[:5]),
                                  classifier_features(module, images[:5]))
    assert json.loads(path.with_suffix(".json").read_text())["feature_dim"] == FEATURE_DIM


def test_rejects_wrong_image_shape():
    module = load_classifier(SHIPPED)
    match = r"takes images \[N, 1, 16, 16\], got shape \[2, 1, 8, 8\]"
    with pytest.raises(CalibexportError, match=match):
        classifier_features(module, np.zeros((2, 1, 8, 8), np.float32))


def test_load_errors(tmp_path):
    with pytest.raises(CalibexportError, match="weights .*missing.safetensors not found"):
        load_classifier(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other))
    with pytest.raises(CalibexportError, match="does not contain digits classifier weights"):
        load_classifier(other)


def test_shift_keeps_content_and_background():
    from calibexport.evaluation.classifier import _shift_batch

    images = torch.full((50, 1, 4, 4), -1.0)
    images[:, 0, 1:3, 1:3] = 1.0
    shifted = _shift_batch(images, torch.Generator().manual_seed(0), max_shift=1)
    assert shifted.shape == images.shape
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == images.sum(dim=(1, 2, 3)))
    assert not torch.equal(shifted, images)


def test_unknown_split():
    with pytest.raises(CalibexportError, match="unknown digits split 'val'"):
        digits_labels("val")
