"""``calibexport validate`` through a real subprocess: exit codes, printed summary, messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from calibexport.validate.perturb import shift_eta_row


def run_validate(*args: str) -> subprocess.CompletedProcess:
    # One torch thread, as in the in-process tests: spinning OpenMP threads on a busy machine
    # slow the PyTorch reference down many times over.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "calibexport", "validate", *args],
                          capture_output=True, text=True, timeout=600, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert text in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_pass_prints_summary_and_exits_0(tiny_artifact, tmp_path):
    result = run_validate("--artifact", str(tiny_artifact), "--report-dir", str(tmp_path),
                          "--runs", "quick", "--atol", "samples=2e-3",
                          "--save-inputs", str(tmp_path / "polygraphy"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("## calibexport parity: PASSED")
    # Polygraphy's own log lines stay out of the summary on stdout.
    assert result.stdout == (tmp_path / "parity.md").read_text()
    assert (tmp_path / "polygraphy" / "inputs.json").is_file()
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["tolerances"]["levels"]["samples"]["atol"] == 2e-3
    assert report["config"]["runs"] == ["singlestep_order3_nfe20", "multistep_order2_nfe10"]


@pytest.mark.slow
def test_perturbed_artifact_exits_1(tiny_artifact, tmp_path):
    artifact = Path(shutil.copytree(tiny_artifact, tmp_path / "artifact"))
    shift_eta_row(artifact, 37, 1e-3)
    reference = tmp_path / "reference.json"
    result = run_validate("--artifact", str(artifact), "--runs", "ddim:1:3",
                          "--save-reference", str(reference))
    assert result.returncode == 1, result.stderr
    assert "## calibexport parity: FAILED" in result.stdout
    assert "at timestep 37" in result.stdout
    assert reference.is_file()

    again = run_validate("--artifact", str(artifact), "--reference", str(reference),
                         "--report-dir", str(tmp_path / "again"))
    assert again.returncode == 1, again.stderr
    assert "at timestep 37" in again.stdout


@pytest.mark.parametrize("args, text", [
    (["--artifact", "/nonexistent/artifact"], "artifact directory /nonexistent/artifact not found"),
    (["--tolerance", "fp64"], "unknown tolerance preset 'fp64'"),
    (["--atol", "often"], "--atol 'often' is not a number"),
    (["--rtol", "steps=1"], "unknown level 'steps'"),
    (["--runs", "ddim:2:10"], "method 'ddim' is first order"),
    (["--provider", "tpu"], "unknown provider 'tpu'"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--reference", "/nonexistent/ref.json"], "reference file /nonexistent/ref.json not found"),
    (["--num-samples", "many"], "Invalid value for '--num-samples'"),
    (["--no-such-flag"], "No such option: --no-such-flag"),
])
def test_bad_input_exits_2_with_one_line(tiny_artifact, args, text):
    if "--artifact" not in args:
        args = ["--artifact", str(tiny_artifact), *args]
    assert_one_line_error(run_validate(*args), text)


def test_reference_with_model_is_rejected(tiny_artifact, tiny_model, tmp_path):
    reference = tmp_path / "ref.json"
    reference.write_text("{}")
    result = run_validate("--artifact", str(tiny_artifact), "--reference", str(reference),
                          "--model", str(tiny_model))
    assert_one_line_error(result, "--model, --config and --weights cannot be combined")
