"""``calibexport evaluate`` through a real subprocess, in one process and under torchrun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GRID = ["--settings", "fixed,fast", "--orders", "1,2", "--nfe", "3,4", "--seeds", "0,1",
        "-n", "6", "--batch-size", "4", "--backend", "torch", "--features", "pixel",
        "--threads", "1"]


def run_cli(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable, "-m"]) + ["calibexport", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reference") / "reference.npy"
    np.save(path, np.random.default_rng(5).uniform(-1, 1, (30, 1, 8, 8)).astype(np.float32))
    return path


def test_dry_run_counts_evaluations(tmp_path):
    result = run_cli("evaluate", "--model", "m", "--eta", "e", "--out", str(tmp_path), "--dry-run",
                     "--settings", "fixed", "--orders", "3", "--nfe", "10,20", "-n", "7")
    assert result.returncode == 0, result.stderr
    # (9 + 18) evaluations per sample, 2 variants, 3 seeds, 7 samples
    assert f"{27 * 2 * 3 * 7} network evaluations" in result.stdout


def test_bad_option_exits_2(tmp_path):
    result = run_cli("evaluate", "--model", "m", "--eta", "e", "--out", str(tmp_path),
                     "--settings", "slow")
    assert result.returncode == 2
    assert "--settings 'slow' is invalid" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_torchrun_matches_single_process(tmp_path, tiny_model, tiny_eta, reference):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    common = ["evaluate", "--model", str(tiny_model), "--eta", str(tiny_eta),
              "--data", str(reference), *GRID]

    single = run_cli(*common, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    launcher = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m"]
    shared = run_cli(*common, "--out", str(tmp_path / "shared"), launcher=launcher)
    assert shared.returncode == 0, shared.stderr
    assert "Rank 1 of 2 joined" in shared.stderr

    first = json.loads((tmp_path / "single" / "results.json").read_text())
    second = json.loads((tmp_path / "shared" / "results.json").read_text())
    assert len(first["rows"]) == len(second["rows"]) == 2 * 2 * 2 * 2
    for a, b in zip(first["rows"], second["rows"]):
        assert a["sample_key"] == b["sample_key"]
        np.testing.assert_allclose(a["metrics"]["pixel"]["fd"], b["metrics"]["pixel"]["fd"],
                                   rtol=1e-5)
    one = np.load(tmp_path / "single" / "samples" / "uncalibrated" / "singlestep-2x2-seed1.npy")
    two = np.load(tmp_path / "shared" / "samples" / "uncalibrated" / "singlestep-2x2-seed1.npy")
    # The random tiny model drives samples to magnitudes of several hundred, and the ranks'
    # smaller batches can round differently in PyTorch's kernels, so the tolerance scales with
    # the largest magnitude (1e-6 of it is about 8 float32 steps there).
    scale = float(np.abs(one).max())
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-6 * scale)
    for name in ("results.md", "fd_vs_nfe.png"):
        assert (tmp_path / "shared" / name).is_file()
