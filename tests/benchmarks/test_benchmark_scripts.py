"""The CPU benchmark scripts run end to end on the tiny model and write sane results."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _import(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, timeout: int = 300) -> None:
    command = [sys.executable, str(BENCHMARKS / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_run_measured_reports_child_peak_not_parent():
    bench_common = _import("bench_common")
    parent_ballast = np.ones(300 * 2**20 // 8)  # 300 MiB resident in this process
    small = bench_common.run_measured([sys.executable, "-c", "print('ok')"])
    large = bench_common.run_measured(
        [sys.executable, "-c", "import time, numpy; a = numpy.ones(200 * 2**20 // 8); "
         "time.sleep(0.3)"])
    assert parent_ballast.sum() > 0
    assert small["returncode"] == 0
    assert small["output"].strip() == "ok"
    assert small["peak_rss_mib"] < 100
    assert large["peak_rss_mib"] > 200


def test_timed_blocks_times_every_call():
    bench_common = _import("bench_common")
    calls = {"a": 0, "b": 0}

    def make(name):
        def call():
            calls[name] += 1
        return call

    times = bench_common.timed_blocks({"a": make("a"), "b": make("b")}, rounds=3, block=4,
                                      warmup=2)
    assert [len(times["a"]), len(times["b"])] == [12, 12]
    assert calls == {"a": 18, "b": 18}


def test_diffusers_peer_counts_steps(tiny_model, tiny_artifact):
    pytest.importorskip("diffusers")
    peer = _import("diffusers_peer")
    from calibexport.models.loaders import load_model
    from calibexport.runtime.artifact import load_manifest
    from calibexport.runtime.eta_table import load_eta_table

    manifest = load_manifest(tiny_artifact)
    eta = load_eta_table(tiny_artifact / "eta.npy").values
    loop = peer.DiffusersLoop(peer.make_scheduler("multistep", 2, manifest.schedule),
                              load_model(tiny_model).module, eta, steps=5)
    x_T = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    sample = loop.run(x_T)
    assert loop.nfe == 5
    assert sample.shape == x_T.shape
    assert np.isfinite(sample).all()


def test_ort_tuning_writes_every_variant(tiny_artifact, tmp_path):
    out = tmp_path / "ort.json"
    _run("ort_tuning.py", "--artifact", str(tiny_artifact), "--threads", "1",
         "--batch-sizes", "2", "--rounds", "1", "--block", "3", "--out", str(out))
    result = json.loads(out.read_text())["results"]["threads=1,batch=2"]
    ort_tuning = _import("ort_tuning")
    assert sorted(result["median_ms"]) == sorted(ort_tuning.VARIANTS)
    assert result["ratio_to_default"]["default"] == 1.0
    assert all(value > 0 for value in result["median_ms"].values())


def test_sampling_speed_compares_contenders(tiny_model, tiny_artifact, tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "speed.json"
    _run("sampling_speed.py", "--artifact", str(tiny_artifact), "--model", str(tiny_model),
         "--threads", "1", "--batch-sizes", "1", "--steps", "4", "--rounds", "1", "--block", "1",
         "--no-compile", "--out", str(out))
    result = json.loads(out.read_text())["results"]["threads=1,batch=1"]
    expected = {"onnxruntime", "torch-eager", "diffusers", "loop-alone", "diffusers-loop-alone"}
    assert set(result["median_ms"]) == expected
    assert 0 < result["loop_share_of_onnxruntime_run"] < 1
    assert math.isfinite(result["onnxruntime_over_diffusers"])


def test_sampling_scaling_covers_grid(tiny_model, tiny_artifact, tmp_path):
    out = tmp_path / "scaling.json"
    _run("sampling_scaling.py", "--artifact", str(tiny_artifact), "--model", str(tiny_model),
         "--threads", "1", "--batch-sizes", "1,2", "--nfe", "2,3", "--rounds", "1", "--block",
         "1", "--out", str(out))
    results = json.loads(out.read_text())["results"]
    assert sorted(results) == ["nfe=2,batch=1", "nfe=2,batch=2", "nfe=3,batch=1", "nfe=3,batch=2"]
    cell = results["nfe=3,batch=2"]
    assert cell["ms_per_image"]["onnxruntime"] == pytest.approx(cell["median_ms"]["onnxruntime"] / 2)
    assert cell["ms_per_evaluation"]["onnxruntime"] == pytest.approx(
        cell["median_ms"]["onnxruntime"] / 3)


@pytest.mark.slow
def test_build_cost_measures_three_steps(tmp_path):
    out = tmp_path / "build.json"
    _run("build_cost.py", "--architecture", "tiny", "--repeats", "1", "--runs", "ddim:1:2",
         "--max-rows", "2", "--out", str(out), timeout=600)
    record = json.loads(out.read_text())
    assert sorted(record["summary"]) == ["build", "plain-export", "validate"]
    for step in record["summary"].values():
        assert step["median_seconds"] > 0
        assert step["median_peak_rss_mib"] > 50
    assert "export_seconds" in record["runs"]["build"][0]["phases"]
    assert record["validate"]["checks"] > 0


@pytest.mark.slow
def test_calibrate_throughput_on_digits(tmp_path):
    out = tmp_path / "calibrate.json"
    _run("calibrate_throughput.py", "--no-celeba64", "--estimators", "control_variate,naive",
         "--digits-samples", "2", "--out", str(out), timeout=600)
    results = json.loads(out.read_text())["results"]
    assert [r["estimator"] for r in results] == ["control_variate", "naive"]
    for result in results:
        assert result["evaluations"] == 2000
        assert result["calibrate_evaluations_per_second"] > 0
        assert result["bare_evaluations_per_second"] > 0
        assert result["calibrate_peak_rss_mib"] > 50
