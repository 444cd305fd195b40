"""The evaluation loop on a tiny real model: ONNX Runtime samples, caching and the reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibexport.errors import CalibexportError
from calibexport.evaluation.evaluate import (
    EvaluationOptions,
    ModelInputs,
    OffsetBackend,
    evaluate_model,
    generate_samples,
    pixel_features,
)
from calibexport.evaluation.plan import SolverConfig
from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from calibexport.runtime.eta_table import load_eta_table
from calibexport.runtime.sampler import make_eps_fn
from calibexport.runtime.schedule import schedule_from_spec

SMALL = EvaluationOptions(settings=("fixed", "fast"), orders=(1, 3), nfes=(3, 5), seeds=(0, 1),
                          num_samples=6, batch_size=4)


@pytest.fixture(scope="module")
def reference_npy(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "reference.npy"
    np.save(path, np.random.default_rng(3).uniform(-1, 1, (40, 1, 8, 8)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model, tiny_eta, reference_npy):
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("evaluation")
    inputs = ModelInputs(model=tiny_model, eta=tiny_eta, data=str(reference_npy))
    results = evaluate_model(inputs, SMALL, out, feature_spaces=("pixel",), threads=1,
                             exporter="torchscript")
    return out, results


@pytest.mark.slow
def test_offset_backend_matches_folded_artifact(tiny_artifact, tiny_eta, evaluated):
    out, _ = evaluated
    table = load_eta_table(tiny_eta)
    calibrated = OffsetBackend(OnnxRuntimeBackend(out / "network.onnx"), table)
    folded = OnnxRuntimeBackend(tiny_artifact / "model.onnx")
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    timestep = np.array([0.0, 41.37, 99.0], dtype=np.float32)
    np.testing.assert_allclose(calibrated.eps(x, timestep), folded.eps(x, timestep), atol=1e-5)
    uncalibrated = calibrated.base.eps(x, timestep)
    assert np.abs(uncalibrated - folded.eps(x, timestep)).max() > 1e-4


def test_results_cover_grid_and_seeds(evaluated):
    _, results = evaluated
    assert results["seeds_completed"] == [0, 1]
    assert len(results["rows"]) == 2 * 2 * 2 * 2
    for row in results["rows"]:
        fds = row["metrics"]["pixel"]["fd"]
        assert len(fds) == 2
        assert all(np.isfinite(fd) and fd > 0 for fd in fds)


def test_fixed_row_reports_real_nfe(evaluated):
    _, results = evaluated
    rows = {(r["setting"], r["order"], r["nfe"], r["calibrated"]): r for r in results["rows"]}
    assert rows[("fixed", 3, 5, True)]["actual_nfe"] == 3
    assert rows[("fast", 3, 5, True)]["actual_nfe"] == 5
    assert rows[("fixed", 3, 5, True)]["step_orders"] == [3]


def test_shared_sample_sets_give_equal_rows(evaluated):
    # Order 1 has the same steps in both allocations, so its rows are the same sample set.
    _, results = evaluated
    rows = {(r["setting"], r["order"], r["nfe"], r["calibrated"]): r for r in results["rows"]}
    assert rows[("fixed", 1, 5, False)]["metrics"] == rows[("fast", 1, 5, False)]["metrics"]
    assert rows[("fixed", 3, 5, False)]["metrics"] != rows[("fast", 3, 5, False)]["metrics"]


def test_calibration_changes_the_samples(evaluated):
    out, _ = evaluated
    uncal = np.load(next(out.glob("samples/uncalibrated/singlestep-3x1-seed0.npy")))
    cal = np.load(next(out.glob("samples/calibrated-*/singlestep-3x1-seed0.npy")))
    assert uncal.shape == (6, 1, 8, 8)
    assert np.abs(uncal - cal).max() > 1e-3


def test_samples_match_direct_solver_run(evaluated, tiny_model, tiny_eta):
    out, _ = evaluated
    spec = json.loads(tiny_model.with_suffix(".json").read_text())
    schedule = schedule_from_spec(spec["schedule"])
    backend = OffsetBackend(OnnxRuntimeBackend(out / "network.onnx"), load_eta_table(tiny_eta))
    direct = generate_samples(make_eps_fn(backend, schedule), schedule, SolverConfig("fast", 3, 5),
                              1, np.arange(6), (1, 8, 8), SMALL)
    cached = np.load(next(out.glob("samples/calibrated-*/singlestep-3x1-2x1-seed1.npy")))
    np.testing.assert_allclose(direct, cached, rtol=0, atol=1e-6)


def test_sample_share_is_batch_independent(evaluated, tiny_eta):
    out, _ = evaluated
    from calibexport.runtime.schedule import DiscreteVPSchedule

    schedule = DiscreteVPSchedule.linear(beta_start=0.001, beta_end=0.2, num_timesteps=100)
    backend = OnnxRuntimeBackend(out / "network.onnx")
    eps_fn = make_eps_fn(backend, schedule)
    config = SolverConfig("fixed", 1, 3)
    whole = generate_samples(eps_fn, schedule, config, 0, np.arange(6), (1, 8, 8), SMALL)
    tail = generate_samples(eps_fn, schedule, config, 0, np.arange(3, 6), (1, 8, 8), SMALL)
    np.testing.assert_allclose(whole[3:], tail, rtol=0, atol=1e-6)


def test_outputs_written(evaluated):
    out, _ = evaluated
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds_completed"] == [0, 1]
    assert saved["inputs"]["backend"] == "onnxruntime"
    markdown = (out / "results.md").read_text()
    assert "DPM-Solver-3 + calibration" in markdown
    assert "†3" in markdown
    assert (out / "fd_vs_nfe.png").stat().st_size > 1000


def test_rerun_reuses_cached_samples(evaluated, tiny_model, tiny_eta, reference_npy, caplog):
    out, results = evaluated
    inputs = ModelInputs(model=tiny_model, eta=tiny_eta, data=str(reference_npy))
    with caplog.at_level("INFO"):
        again = evaluate_model(inputs, SMALL, out, feature_spaces=("pixel",), threads=1,
                               exporter="torchscript")
    assert again["rows"] == results["rows"]
    assert "cached" in caplog.text
    assert "eval/s" not in caplog.text


def test_changed_settings_are_rejected(evaluated, tiny_model, tiny_eta, reference_npy):
    out, _ = evaluated
    inputs = ModelInputs(model=tiny_model, eta=tiny_eta, data=str(reference_npy))
    options = EvaluationOptions(settings=("fixed",), orders=(1,), nfes=(3,), seeds=(0,),
                                num_samples=5, batch_size=5)
    match = r"contains samples made with other settings \(changed: num_samples\)"
    with pytest.raises(CalibexportError, match=match):
        evaluate_model(inputs, options, out, feature_spaces=("pixel",), threads=1)


def test_classifier_needs_digits_shape(tmp_path, tiny_model, tiny_eta, reference_npy):
    inputs = ModelInputs(model=tiny_model, eta=tiny_eta, data=str(reference_npy))
    with pytest.raises(CalibexportError, match="takes 1x16x16 images but the model makes 1x8x8"):
        evaluate_model(inputs, SMALL, tmp_path, feature_spaces=("classifier",))


def test_unknown_feature_space(tmp_path, tiny_model, tiny_eta, reference_npy):
    inputs = ModelInputs(model=tiny_model, eta=tiny_eta, data=str(reference_npy))
    with pytest.raises(CalibexportError, match="unknown feature space 'inception'"):
        evaluate_model(inputs, SMALL, tmp_path, feature_spaces=("inception",))


def test_pixel_features_clip_and_flatten():
    images = np.array([[[[2.0, -3.0], [0.5, 0.0]]]], dtype=np.float32)
    features = pixel_features(images)
    assert features.shape == (1, 4)
    np.testing.assert_array_equal(features[0], [1.0, -1.0, 0.5, 0.0])


def test_results_record_inputs(evaluated, tiny_eta):
    out, _ = evaluated
    saved = json.loads((out / "results.json").read_text())
    assert saved["inputs"]["eta"] == str(tiny_eta)
    assert saved["inputs"]["eta_estimation"]["num_samples"] == 4
    assert len(saved["inputs"]["eta_sha256"]) == 64
    assert [row["timestep"] for row in saved["eta_noise"]] == [0, 10, 50]
