"""--save-inputs writes files that Polygraphy loads and compares against ONNX Runtime."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibexport.validate.perturb import shift_eta_row
from calibexport.validate.polygraphy_files import RUNNER_NAME
from calibexport.validate.run import ValidateOptions, validate_directory

RUNS = "singlestep:2:4"


def save_inputs(artifact: Path, directory: Path) -> dict:
    options = ValidateOptions(runs=RUNS, save_inputs=directory / "polygraphy")
    return validate_directory(artifact, report_dir=directory, options=options)


def test_files_load_with_polygraphy(tiny_artifact, tmp_path):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    report = save_inputs(tiny_artifact, tmp_path)
    directory = tmp_path / "polygraphy"
    feeds = load_json(str(directory / "inputs.json"))
    results = RunResults.load(str(directory / "outputs.json"))
    index = json.loads((directory / "iterations.json").read_text())

    assert list(results.keys()) == [RUNNER_NAME]
    outputs = results[RUNNER_NAME]
    assert len(feeds) == len(outputs) == len(index) == report["reproduce"]["num_iterations"]
    assert set(feeds[0]) == {"x", "t"}
    assert feeds[0]["x"].dtype == np.float32
    assert feeds[0]["t"].dtype == np.float32
    assert outputs[0]["eps"].shape == feeds[0]["x"].shape
    checks = {item["check"] for item in index}
    assert "evaluation/integer_timesteps" in checks
    # A 4-evaluation run adds 4 model calls of its own.
    assert sum(item["check"] == "trajectory/singlestep_order2_nfe4" for item in index) == 4
    assert index[0]["timesteps"] == feeds[0]["t"].astype(float).tolist()


def test_report_carries_polygraphy_command(tiny_artifact, tmp_path):
    report = save_inputs(tiny_artifact, tmp_path)
    command = shlex.split(report["reproduce"]["command"])
    assert command[:4] == ["polygraphy", "run", str(tiny_artifact / "model.onnx"), "--onnxrt"]
    assert command[command.index("--atol") + 1] == "0.0001"
    markdown = (tmp_path / "parity.md").read_text()
    assert report["reproduce"]["command"] in markdown


@pytest.mark.slow
def test_polygraphy_run_reproduces_pass_and_failure(tiny_artifact, tmp_path):
    polygraphy = shutil.which("polygraphy", path=str(Path(sys.executable).parent))
    assert polygraphy is not None, "polygraphy is installed with calibexport"

    def run(artifact: Path, directory: Path) -> subprocess.CompletedProcess:
        command = shlex.split(save_inputs(artifact, directory)["reproduce"]["command"])
        return subprocess.run([polygraphy, *command[1:]], capture_output=True, text=True,
                              timeout=300)

    clean = run(tiny_artifact, tmp_path / "clean")
    assert clean.returncode == 0, clean.stdout[-2000:] + clean.stderr[-2000:]
    assert "PASSED" in clean.stdout + clean.stderr

    perturbed = Path(shutil.copytree(tiny_artifact, tmp_path / "perturbed"))
    shift_eta_row(perturbed, 37, 1e-3)
    failed = run(perturbed, tmp_path / "failed")
    assert failed.returncode != 0
    assert "FAILED" in failed.stdout + failed.stderr
