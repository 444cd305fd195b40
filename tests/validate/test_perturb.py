"""Perturbed copies of a real artifact stay consistent with their manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibexport.errors import CalibexportError
from calibexport.runtime.artifact import load_manifest, verify_artifact_files
from calibexport.validate.perturb import shift_eta_row, shift_weight


def initializer(artifact: Path, name: str) -> np.ndarray:
    model = onnx.load(str(artifact / "model.onnx"))
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


@pytest.fixture()
def artifact_copy(tmp_path, tiny_artifact) -> Path:
    return Path(shutil.copytree(tiny_artifact, tmp_path / "artifact"))


def test_shift_eta_row_changes_one_row(artifact_copy, tiny_artifact):
    name = shift_eta_row(artifact_copy, 37, 1e-3)
    before, after = initializer(tiny_artifact, name), initializer(artifact_copy, name)
    changed = np.flatnonzero(np.abs(after - before).reshape(len(after), -1).max(axis=1))
    assert changed.tolist() == [37]
    assert np.allclose(after[37] - before[37], 1e-3, atol=1e-7)
    verify_artifact_files(artifact_copy, load_manifest(artifact_copy))


def test_shift_weight_changes_named_initializer(artifact_copy, tiny_artifact):
    name = shift_weight(artifact_copy, "conv_out.bias", 0.01)
    assert name.endswith("conv_out.bias")
    assert np.allclose(initializer(artifact_copy, name) - initializer(tiny_artifact, name), 0.01)
    verify_artifact_files(artifact_copy, load_manifest(artifact_copy))


def test_ambiguous_initializer_is_rejected(artifact_copy):
    with pytest.raises(CalibexportError, match="expected one matching initializer"):
        shift_weight(artifact_copy, "bias", 0.01)
