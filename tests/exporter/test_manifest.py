"""Writing artifact manifests and reading them back with the runtime reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibexport.errors import CalibexportError
from calibexport.exporter.manifest import MANIFEST_VERSION, build_manifest, write_manifest
from calibexport.hashing import sha256_file
from calibexport.runtime.artifact import load_manifest, verify_artifact_files

SCHEDULE = {"kind": "discrete", "beta_schedule": "linear", "beta_start": 0.0001,
            "beta_end": 0.02, "num_timesteps": 1000}


@pytest.fixture
def artifact_dir(tmp_path):
    directory = tmp_path / "artifact"
    directory.mkdir()
    (directory / "model.onnx").write_bytes(b"onnx bytes")
    np.save(directory / "eta.npy", np.zeros((4, 1, 8, 8), dtype=np.float32))
    return directory


def make_manifest(directory, **overrides):
    arguments = dict(
        schedule=SCHEDULE, prediction_type="eps", image_shape=(1, 8, 8), num_timesteps=4,
        weights_sha256="ab" * 32, model_path="/models/tiny.safetensors", config="digits",
        weights="ema", export_info={"exporter": "dynamo", "opset": 20, "path": "/tmp/x.onnx"},
        eta_sha256="cd" * 32,
    )
    arguments.update(overrides)
    return build_manifest(directory, **arguments)


def test_manifest_round_trip(artifact_dir):
    write_manifest(artifact_dir, make_manifest(artifact_dir))
    manifest = load_manifest(artifact_dir)
    assert manifest.version == MANIFEST_VERSION
    assert manifest.schedule == SCHEDULE
    assert manifest.prediction_type == "eps"
    assert manifest.image_shape == (1, 8, 8)
    assert manifest.weights_sha256 == "ab" * 32
    assert manifest.source["model_path"] == "/models/tiny.safetensors"
    assert manifest.source["config"] == "digits"
    assert manifest.source["weights"] == "ema"
    assert manifest.export == {"exporter": "dynamo", "opset": 20}


def test_manifest_hashes_files(artifact_dir):
    manifest = make_manifest(artifact_dir)
    assert manifest["files"]["model.onnx"]["sha256"] == sha256_file(artifact_dir / "model.onnx")
    assert manifest["files"]["eta.npy"]["sha256"] == sha256_file(artifact_dir / "eta.npy")
    assert manifest["files"]["model.onnx"]["bytes"] == len(b"onnx bytes")


def test_manifest_timestep_float(artifact_dir):
    timestep = make_manifest(artifact_dir)["timestep"]
    assert timestep["input"] == "t"
    assert timestep["dtype"] == "float32"
    assert timestep["range"] == [0, 3]
    assert timestep["interpolation"] == "linear"
    assert "floor" in timestep["rule"]


def test_manifest_timestep_integer(artifact_dir):
    timestep = make_manifest(artifact_dir, timestep_dtype="int64")["timestep"]
    assert timestep["dtype"] == "int64"
    assert timestep["interpolation"] == "exact"


def test_manifest_versions(artifact_dir):
    versions = make_manifest(artifact_dir)["versions"]
    assert set(versions) >= {"calibexport", "torch", "onnx", "onnxruntime", "python"}


def test_manifest_is_json_with_creation_time(artifact_dir):
    path = write_manifest(artifact_dir, make_manifest(artifact_dir))
    data = json.loads(path.read_text())
    assert data["manifest_version"] == MANIFEST_VERSION
    assert data["created"].endswith("+00:00")


def test_manifest_missing_file(artifact_dir):
    (artifact_dir / "eta.npy").unlink()
    with pytest.raises(CalibexportError, match="eta.npy not found"):
        make_manifest(artifact_dir)


def test_manifest_extra_files_and_source(artifact_dir):
    (artifact_dir / "model.plan").write_bytes(b"engine")
    manifest = make_manifest(artifact_dir, files=("model.onnx", "eta.npy", "model.plan"),
                             source_extra={"format": "native"})
    assert "model.plan" in manifest["files"]
    assert manifest["source"]["format"] == "native"


def test_manifest_bad_image_shape(artifact_dir):
    with pytest.raises(CalibexportError, match=r"image_shape must be \[C, H, W\], got \[8, 8\]"):
        make_manifest(artifact_dir, image_shape=(8, 8))


def test_manifest_hash_mismatch_detected(artifact_dir):
    write_manifest(artifact_dir, make_manifest(artifact_dir))
    (artifact_dir / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(CalibexportError, match="model.onnx: sha256") as raised:
        verify_artifact_files(artifact_dir, load_manifest(artifact_dir))
    assert "eta.npy" not in str(raised.value)
