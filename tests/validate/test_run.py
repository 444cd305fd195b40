"""validate on real artifacts: the unperturbed build passes, perturbed ones fail and say where."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibexport.errors import CalibexportError
from calibexport.hashing import sha256_file
from calibexport.validate.run import validate_directory


def perturb_initializer(artifact: Path, select, change) -> None:
    """Change one initializer of model.onnx and re-sign the manifest, as a consistent bad build."""
    path = artifact / "model.onnx"
    model = onnx.load(str(path))
    chosen = [init for init in model.graph.initializer if select(init)]
    assert len(chosen) == 1, [init.name for init in chosen]
    values = numpy_helper.to_array(chosen[0]).copy()
    change(values)
    chosen[0].CopyFrom(numpy_helper.from_array(values, chosen[0].name))
    onnx.save(model, str(path))
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"]["model.onnx"]["sha256"] = sha256_file(path)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture()
def artifact_copy(tmp_path, tiny_artifact) -> Path:
    return Path(shutil.copytree(tiny_artifact, tmp_path / "artifact"))


def test_unperturbed_artifact_passes(artifact_copy):
    report = validate_directory(artifact_copy)
    assert report["status"] == "PASSED"
    levels = {check["level"] for check in report["checks"]}
    assert levels == {"evaluation", "trajectory", "samples"}


def test_eta_shift_at_one_timestep_is_named(artifact_copy):
    def shift_row_37(values):
        values[37] += 1e-3

    perturb_initializer(artifact_copy, lambda init: list(init.dims) == [100, 1, 8, 8], shift_row_37)
    report = validate_directory(artifact_copy)
    assert report["status"] == "FAILED"
    integer = next(c for c in report["checks"] if c["name"] == "evaluation/integer_timesteps")
    assert not integer["passed"]
    assert integer["worst_timestep"] == 37.0
    assert integer["stats"]["max_abs"] == pytest.approx(1e-3, rel=0.05)

    markdown = (artifact_copy / "parity.md").read_text()
    assert "FAILED" in markdown
    assert "| 37 |" in markdown
    suite = ET.parse(artifact_copy / "parity.xml").getroot().find("testsuite")
    failures = [case.find("failure") for case in suite.findall("testcase") if case.find("failure") is not None]
    assert any("at timestep 37" in failure.get("message") for failure in failures)


def test_changed_weight_fails(artifact_copy):
    def nudge(values):
        values += 0.01

    perturb_initializer(artifact_copy, lambda init: init.name.endswith("conv_out.bias"), nudge)
    report = validate_directory(artifact_copy)
    assert report["status"] == "FAILED"
    failed = {c["level"] for c in report["checks"] if not c["passed"]}
    assert "evaluation" in failed


def test_tampered_file_is_rejected_before_checks(artifact_copy):
    table = np.load(artifact_copy / "eta.npy")
    np.save(artifact_copy / "eta.npy", table + 1.0)
    with pytest.raises(CalibexportError, match="eta.npy"):
        validate_directory(artifact_copy)
