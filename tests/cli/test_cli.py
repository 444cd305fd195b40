"""The calibexport command end to end on a tiny real model, through a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibexport", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def images_npy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-data") / "images.npy"
    np.save(path, np.random.default_rng(1).uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32))
    return path


@pytest.mark.slow
def test_calibrate_build_sample_validate(tmp_path, tiny_model, images_npy):
    eta = tmp_path / "eta.npy"
    result = run_cli("calibrate", "--model", str(tiny_model), "--data", str(images_npy), "--out", str(eta),
                     "--num-samples", "4")
    assert result.returncode == 0, result.stderr
    assert eta.is_file()
    sidecar = json.loads(eta.with_suffix(".json").read_text())
    assert sidecar["num_samples"] == 4
    assert np.load(eta).shape == (100, 1, 8, 8)

    artifact = tmp_path / "build"
    result = run_cli("build", "--model", str(tiny_model), "--eta", str(eta), "--out", str(artifact))
    assert result.returncode == 0, result.stderr
    for name in ("model.onnx", "manifest.json", "eta.npy", "parity.json", "parity.md", "parity.xml"):
        assert (artifact / name).is_file(), name
    assert json.loads((artifact / "parity.json").read_text())["status"] == "PASSED"
    assert "PASSED" in result.stdout

    again = run_cli("build", "--model", str(tiny_model), "--eta", str(eta), "--out", str(artifact))
    assert again.returncode == 2
    assert "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr

    png = tmp_path / "samples.png"
    result = run_cli("sample", "--artifact", str(artifact), "-n", "6", "--steps", "5", "--order", "2",
                     "--out", str(png))
    assert result.returncode == 0, result.stderr
    with Image.open(png) as image:
        assert image.mode == "L"
    raw = np.load(png.with_suffix(".npz"))
    assert raw["samples"].shape == (6, 1, 8, 8)
    assert np.all(np.isfinite(raw["samples"]))

    result = run_cli("validate", "--artifact", str(artifact))
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout


def test_missing_model_exits_2_without_traceback(tmp_path):
    result = run_cli("build", "--model", str(tmp_path / "nope.safetensors"), "--eta", str(tmp_path / "eta.npy"),
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "nope.safetensors" in result.stderr
    assert not (tmp_path / "out").exists()


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("calibrate", "build", "sample", "validate"):
        assert command in result.stdout
