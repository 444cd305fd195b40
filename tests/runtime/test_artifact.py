"""Reading artifact manifests without torch and checking file digests."""

from __future__ import annotations

import json

import pytest

from calibexport.errors import CalibexportError
from calibexport.hashing import sha256_file
from calibexport.runtime.artifact import (
    MANIFEST_VERSION,
    Manifest,
    load_manifest,
    verify_artifact_files,
)


def write_artifact(directory, **overrides):
    """Write two files and a minimal valid manifest listing them."""
    directory.mkdir(exist_ok=True)
    (directory / "model.onnx").write_bytes(b"model")
    (directory / "eta.npy").write_bytes(b"table")
    document = {
        "manifest_version": MANIFEST_VERSION,
        "schedule": {"kind": "linear", "beta_0": 0.1, "beta_1": 20.0},
        "prediction_type": "eps",
        "image_shape": [3, 32, 32],
        "timestep": {"input": "t", "dtype": "float32", "num_timesteps": 1000,
                     "range": [0, 999], "interpolation": "linear"},
        "files": {name: {"sha256": sha256_file(directory / name)}
                  for name in ("model.onnx", "eta.npy")},
        "source": {"model_path": "m.pt", "config": None, "weights": "ema",
                   "weights_sha256": "ef" * 32},
    }
    document.update(overrides)
    (directory / "manifest.json").write_text(json.dumps(document))
    return directory


def test_load_manifest_fields(tmp_path):
    manifest = load_manifest(write_artifact(tmp_path / "a"))
    assert isinstance(manifest, Manifest)
    assert manifest.image_shape == (3, 32, 32)
    assert manifest.timestep_input == "t"
    assert manifest.timestep_dtype == "float32"
    assert manifest.num_timesteps == 1000
    assert manifest.weights_sha256 == "ef" * 32
    assert manifest.schedule["kind"] == "linear"


def test_load_manifest_missing_directory(tmp_path):
    with pytest.raises(CalibexportError, match="artifact directory .*missing not found"):
        load_manifest(tmp_path / "missing")


def test_load_manifest_missing_file(tmp_path):
    with pytest.raises(CalibexportError, match="manifest.json not found"):
        load_manifest(tmp_path)


def test_load_manifest_corrupt_json(tmp_path):
    (tmp_path / "manifest.json").write_text('{"manifest_version": 1,')
    with pytest.raises(CalibexportError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_load_manifest_not_an_object(tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(CalibexportError, match="contains a JSON list"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_load_manifest_unsupported_version(tmp_path, version):
    directory = write_artifact(tmp_path / "a", manifest_version=version)
    with pytest.raises(CalibexportError, match=f"manifest_version {version!r}"):
        load_manifest(directory)


def test_load_manifest_missing_keys(tmp_path):
    directory = write_artifact(tmp_path / "a")
    document = json.loads((directory / "manifest.json").read_text())
    del document["schedule"]
    (directory / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(CalibexportError, match=r"missing the keys \['schedule'\]"):
        load_manifest(directory)


def test_load_manifest_malformed_files(tmp_path):
    directory = write_artifact(tmp_path / "a", files={"model.onnx": "no digest object"})
    with pytest.raises(CalibexportError, match="is malformed"):
        load_manifest(directory)


def test_verify_artifact_files_passes(tmp_path):
    directory = write_artifact(tmp_path / "a")
    verify_artifact_files(directory, load_manifest(directory))


def test_verify_artifact_files_names_each_change(tmp_path):
    directory = write_artifact(tmp_path / "a")
    manifest = load_manifest(directory)
    (directory / "model.onnx").write_bytes(b"changed")
    (directory / "eta.npy").unlink()
    with pytest.raises(CalibexportError) as raised:
        verify_artifact_files(directory, manifest)
    assert "model.onnx: sha256" in str(raised.value)
    assert "eta.npy: missing" in str(raised.value)
