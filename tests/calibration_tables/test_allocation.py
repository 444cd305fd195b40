"""Tests for allocating samples across rows and for sampling to a relative standard error."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from calibexport.calibration_tables.allocation import (
    allocate_samples,
    relative_standard_error,
    rms_standard_error,
)
from calibexport.calibration_tables.estimate import estimate_eta
from calibexport.errors import CalibexportError
from calibexport.runtime.schedule import DiscreteVPSchedule

torch.set_num_threads(1)

SCHEDULE = DiscreteVPSchedule.linear(beta_start=1e-3, beta_end=0.3, num_timesteps=12)


class NoisyOffset(torch.nn.Module):
    """eps = offset + e * spread_k: row k has eta = offset and term variance spread_k^2 (naive)."""

    def __init__(self, spread: np.ndarray, offset: float = 0.5) -> None:
        super().__init__()
        self.spread = spread
        self.offset = offset

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        # With zero data x_t = sigma_k e, so e is recovered from x.
        rows = timestep.numpy().astype(np.int64)
        sigma = np.sqrt(1 - np.exp(2 * SCHEDULE.log_alpha_array[rows])).reshape(-1, 1, 1, 1)
        noise = x.numpy().astype(np.float64) / sigma
        eps = self.offset + noise * self.spread[rows].reshape(-1, 1, 1, 1)
        return torch.from_numpy(eps.astype(np.float32))


SPREAD = np.geomspace(2.0, 0.05, 12)
ZEROS = np.zeros((4, 1, 2, 2), dtype=np.float32)


def test_relative_standard_error_definition() -> None:
    eta = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]).reshape(3, 1, 1, 2)
    standard_error = np.array([[0.3, 0.4], [0.1, 0.1], [0.0, 0.0]]).reshape(3, 1, 1, 2)
    relative = relative_standard_error(eta, standard_error)

    assert relative[0] == pytest.approx(0.1)
    assert relative[1] == np.inf
    assert relative[2] == 0.0
    np.testing.assert_allclose(rms_standard_error(standard_error),
                               [np.sqrt(0.125), 0.1, 0.0])


def test_allocation_follows_variance() -> None:
    counts = allocate_samples(np.array([1.0, 0.25, 0.01, 0.0]), 0.1, estimator="naive")

    assert counts.tolist() == [100, 25, 2, 2]
    assert allocate_samples(np.array([0.0301]), 0.1, estimator="naive").tolist() == [4]


def test_allocation_per_row_targets_and_cap() -> None:
    counts = allocate_samples(np.array([1.0, 1.0]), np.array([0.1, 0.5]), estimator="naive",
                              maximum=50)

    assert counts.tolist() == [50, 4]


def test_allocation_counts_pairs() -> None:
    counts = allocate_samples(np.array([1.0, 0.0]), 0.1, estimator="antithetic", maximum=51)

    assert counts.tolist() == [50, 4]
    assert allocate_samples(np.array([1.0]), 1.0, estimator="regression_pixel").tolist() == [3]


def test_allocation_rejects_negative_target() -> None:
    with pytest.raises(CalibexportError, match="target standard errors must be >= 0"):
        allocate_samples(np.array([1.0]), -0.1, estimator="naive")


def test_target_reached_with_fewer_samples(caplog: pytest.LogCaptureFixture) -> None:
    model = NoisyOffset(SPREAD)
    with caplog.at_level(logging.INFO, logger="calibexport.calibration_tables"):
        result = estimate_eta(model, SCHEDULE, ZEROS, num_samples=16, estimator="naive",
                              target_se=0.1, max_samples=4096, progress=False)
    relative = relative_standard_error(result.eta, result.standard_error)
    summary = result.sampling_summary()

    assert relative.max() < 0.1
    assert summary["max_relative_se"] == pytest.approx(relative.max(), rel=1e-6)
    assert summary["target_relative_se"] == 0.1
    # The noisiest row needs about (2 / 0.5 / 0.1)^2 = 1600 samples, the quietest the pilot.
    assert result.row_samples[0] > 1000
    assert result.row_samples[-1] == 16
    assert np.all(np.diff(result.row_samples) <= 0)
    assert summary["total_evaluations"] == int(result.row_samples.sum())
    assert result.num_samples == 16
    assert "Round 1:" in caplog.text
    np.testing.assert_allclose(result.eta, 0.5, atol=4 * 0.1 * 0.5)


def test_target_is_deterministic() -> None:
    model = NoisyOffset(SPREAD)
    runs = [estimate_eta(model, SCHEDULE, ZEROS, num_samples=8, estimator="control_variate",
                         target_se=0.2, seed=1, progress=False) for _ in range(2)]

    np.testing.assert_array_equal(runs[0].eta, runs[1].eta)
    np.testing.assert_array_equal(runs[0].row_samples, runs[1].row_samples)


def test_target_antithetic_counts_stay_even() -> None:
    # eps = 0.5 + spread e is odd in e around 0.5, so pairs cancel the noise entirely.
    result = estimate_eta(NoisyOffset(SPREAD), SCHEDULE, ZEROS, num_samples=8,
                          estimator="antithetic", target_se=0.05, progress=False)

    assert np.all(result.row_samples % 2 == 0)
    assert result.row_samples.tolist() == [8] * 12
    np.testing.assert_allclose(result.eta, 0.5, atol=1e-6)


def test_cap_warns_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="calibexport.calibration_tables"):
        result = estimate_eta(NoisyOffset(SPREAD), SCHEDULE, ZEROS, num_samples=8,
                              estimator="naive", target_se=0.01, max_samples=64, progress=False)

    assert result.row_samples.max() == 64
    assert "reached 64 evaluations with a relative standard error still >= 0.01" in caplog.text
    assert "raise --max-samples or --target-se" in caplog.text


def test_zero_eta_row_hits_cap(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="calibexport.calibration_tables"):
        result = estimate_eta(NoisyOffset(SPREAD, offset=0.0), SCHEDULE, ZEROS, num_samples=8,
                              estimator="naive", target_se=0.5, max_samples=32, progress=False)

    assert result.row_samples.tolist() == [32] * 12
    assert "relative standard error still >= 0.5" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_se": 0.0}, "target_se must be a positive number"),
        ({"target_se": float("nan")}, "target_se must be a positive number"),
        ({"target_se": 0.1, "max_samples": 4}, r"max_samples must be an integer >= the pilot"),
        ({"target_se": 0.1, "max_samples": 33, "estimator": "antithetic"},
         "max_samples must be even"),
    ],
)
def test_rejects_invalid_targets(kwargs: dict, message: str) -> None:
    options = {"num_samples": 8, "estimator": "naive", "progress": False, **kwargs}
    with pytest.raises(CalibexportError, match=message):
        estimate_eta(NoisyOffset(SPREAD), SCHEDULE, ZEROS, **options)


def test_calibrate_records_allocation(tmp_path, tiny_model) -> None:
    import json

    from calibexport.calibration_tables.calibrate import calibrate_to_file

    data = tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32))
    out = tmp_path / "eta.npy"
    calibrate_to_file(model=tiny_model, data=str(data), out=out, num_samples=4,
                      estimator="regression", target_se=0.8, max_samples=64, batch_size=128,
                      progress=False)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    sampling = sidecar["sampling"]

    assert sidecar["estimator"] == "regression"
    assert sampling["target_relative_se"] == 0.8
    assert sampling["max_relative_se"] < 0.8
    assert len(sampling["row_samples"]) == 100
    assert min(sampling["row_samples"]) == sidecar["num_samples"] == 4
    # Noisier rows of the random tiny model get more samples, none up to the cap.
    assert 4 < max(sampling["row_samples"]) < 64
    assert sampling["total_evaluations"] == sum(sampling["row_samples"])
    assert len(sidecar["standard_error"]["row_rms"]) == 100


def test_calibrate_shard_rejects_target(tmp_path, tiny_model) -> None:
    from calibexport.calibration_tables.calibrate import calibrate_to_file

    data = tmp_path / "images.npy"
    np.save(data, np.zeros((2, 1, 8, 8), dtype=np.float32))
    with pytest.raises(CalibexportError, match="--target-se needs the sums of all shards"):
        calibrate_to_file(model=tiny_model, data=str(data), out=tmp_path / "eta.npy",
                          num_samples=4, target_se=0.3, shard="1/2", progress=False)
