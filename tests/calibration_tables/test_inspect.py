"""Tests for inspecting eta tables: the likelihood weight, the loss identity and the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibexport.calibration_tables.estimate import table_coefficients
from calibexport.calibration_tables.inspect import (
    check_identity,
    default_heatmap_rows,
    half_squared_norm,
    identity_timesteps,
    inspect_table,
    likelihood_weight,
    row_times,
    table_summary,
)
from calibexport.errors import CalibexportError
from calibexport.runtime.schedule import DiscreteVPSchedule, LinearVPSchedule
from calibexport.testing.gaussian import GaussianData

torch.set_num_threads(1)

SCHEDULE = DiscreteVPSchedule.linear(beta_start=1e-3, beta_end=0.3, num_timesteps=20)
ALPHA, SIGMA = table_coefficients(SCHEDULE)
GAUSSIAN = GaussianData(mean=np.array([0.2, -0.4]).reshape(2, 1, 1),
                        std=np.array([0.5, 0.8]).reshape(2, 1, 1))
OFFSET = np.array([0.3, -0.2]).reshape(2, 1, 1)


class OffsetGaussianEps(torch.nn.Module):
    """Exact noise prediction for ``GAUSSIAN`` plus a per-channel offset, so eta = OFFSET."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        rows = timestep.numpy().astype(np.int64)
        alpha = ALPHA[rows].reshape(-1, 1, 1, 1)
        sigma = SIGMA[rows].reshape(-1, 1, 1, 1)
        eps = GAUSSIAN.eps(x.numpy().astype(np.float64), alpha, sigma) + OFFSET
        return torch.from_numpy(eps.astype(np.float32))


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return GAUSSIAN.sample(np.random.default_rng(7), (400, 2, 4, 4))


def exact_table() -> np.ndarray:
    return np.broadcast_to(OFFSET, (20, 2, 4, 4)).astype(np.float32)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibexport", *args], capture_output=True,
                          text=True, timeout=600)


def test_weight_discrete_schedule() -> None:
    schedule = DiscreteVPSchedule.linear()
    k = np.array([1, 100, 500, 998])
    weight = likelihood_weight(schedule, row_times(schedule, 1000)[k])
    # Central difference at a knot: the mean slope of the two segments, about N beta.
    betas = schedule.betas
    g_squared = -500.0 * (np.log1p(-betas[k]) + np.log1p(-betas[k + 1]))
    _, sigma = schedule.alpha_sigma_at_timesteps()

    np.testing.assert_allclose(weight, g_squared / (2 * sigma[k] ** 2), rtol=1e-2)
    np.testing.assert_allclose(weight * 2 * sigma[k] ** 2, 500 * (betas[k] + betas[k + 1]),
                               rtol=2e-2)


def test_weight_linear_schedule() -> None:
    schedule = LinearVPSchedule()
    t = np.array([1e-3, 0.25, 0.5, 1.0])
    beta = 0.1 + t * (20.0 - 0.1)

    np.testing.assert_allclose(likelihood_weight(schedule, t),
                               beta / (2 * schedule.sigma(t) ** 2), rtol=1e-6)


def test_summary_values() -> None:
    eta = np.zeros((20, 1, 2, 2))
    eta[:, 0, 0, 0] = np.arange(20)
    summary = table_summary(eta, SCHEDULE, row_rms_se=np.full(20, 0.5))
    t = row_times(SCHEDULE, 20)
    weighted = likelihood_weight(SCHEDULE, t) * np.arange(20) ** 2

    np.testing.assert_allclose(half_squared_norm(eta), 0.5 * np.arange(20) ** 2)
    np.testing.assert_allclose(summary["likelihood_weighted"], weighted)
    assert summary["likelihood_bound_decrease"] == pytest.approx(
        float(np.sum(0.5 * (weighted[1:] + weighted[:-1]) * np.diff(t))))
    np.testing.assert_allclose(summary["half_squared_se_norm"], 0.5 * 4 * 0.25)


def test_identity_holds_exact_eta(held_out: np.ndarray) -> None:
    rows = check_identity(OffsetGaussianEps(), SCHEDULE, exact_table(), held_out,
                          timesteps=np.array([0, 5, 19]), repeats=2)
    expected = 0.5 * float((OFFSET**2).sum() * 16)

    assert [row.timestep for row in rows] == [0, 5, 19]
    for row in rows:
        assert row.half_squared_norm == pytest.approx(expected, rel=1e-6)
        assert row.decrease == pytest.approx(row.loss_uncalibrated - row.loss_calibrated)
        assert row.decrease_se > 0
        assert abs(row.z) < 4, row


def test_identity_detects_wrong_eta(held_out: np.ndarray) -> None:
    # With 2 eta the decrease is 2||eta||^2 - 2||eta||^2 = 0, not the predicted 2||eta||^2.
    rows = check_identity(OffsetGaussianEps(), SCHEDULE, 2 * exact_table(), held_out,
                          timesteps=np.array([3]), repeats=1)

    assert abs(rows[0].decrease) < 4 * rows[0].decrease_se
    assert rows[0].z < -10


def test_identity_noise_correction(held_out: np.ndarray) -> None:
    spread = 0.2
    noisy = exact_table() + spread * np.random.default_rng(3).standard_normal((20, 2, 4, 4))
    rows = check_identity(OffsetGaussianEps(), SCHEDULE, noisy.astype(np.float32), held_out,
                          timesteps=np.arange(20), repeats=1, row_rms_se=np.full(20, spread))
    z = np.array([row.z for row in rows])

    assert rows[0].noise_correction == pytest.approx(32 * spread**2)
    assert rows[0].predicted == pytest.approx(rows[0].half_squared_norm - 32 * spread**2)
    assert rows[0].predicted_se > 0
    # The corrected prediction fits; the uncorrected one is high by ||SE||^2 = 1.28 per row.
    assert np.abs(z).max() < 4
    measured = np.array([row.decrease for row in rows])
    uncorrected = np.array([row.half_squared_norm for row in rows])
    assert (uncorrected - measured).mean() > 0.8


def test_identity_rejects_bad_inputs(held_out: np.ndarray) -> None:
    model = OffsetGaussianEps()
    with pytest.raises(CalibexportError, match="the eta table has 5 rows but the schedule has 20"):
        check_identity(model, SCHEDULE, exact_table()[:5], held_out, timesteps=np.array([0]))
    with pytest.raises(CalibexportError, match="repeats must be a positive integer"):
        check_identity(model, SCHEDULE, exact_table(), held_out, timesteps=np.array([0]),
                       repeats=0)
    with pytest.raises(CalibexportError, match="at least 2 held-out images"):
        check_identity(model, SCHEDULE, exact_table(), held_out[:1], timesteps=np.array([0]))


def test_row_choices() -> None:
    assert default_heatmap_rows(1000) == [0, 200, 400, 599, 799, 999]
    assert identity_timesteps(100, 5).tolist() == [0, 25, 50, 74, 99]
    with pytest.raises(CalibexportError, match="at least 1 timestep"):
        identity_timesteps(100, 0)


def test_inspect_writes_plots(tmp_path: Path, tiny_eta: Path) -> None:
    record = inspect_table(tiny_eta, tmp_path / "out", heatmap_rows=[0, 50, 99])

    for name in ("eta_norm.png", "eta_heatmaps.png"):
        with Image.open(tmp_path / "out" / name) as image:
            assert image.format == "PNG"
            assert image.size[0] > 300
    assert not (tmp_path / "out" / "identity.png").exists()
    assert record["num_timesteps"] == 100
    assert len(record["half_squared_se_norm"]) == 100
    assert "identity" not in record
    assert "likelihood-bound decrease" in (tmp_path / "out" / "summary.md").read_text()


def test_inspect_rejects_bad_row(tmp_path: Path, tiny_eta: Path) -> None:
    with pytest.raises(CalibexportError, match="heat map row 100 is outside the table's rows"):
        inspect_table(tiny_eta, tmp_path / "out", heatmap_rows=[0, 100])


@pytest.mark.slow
def test_inspect_command_with_model(tmp_path: Path, tiny_model: Path, tiny_eta: Path) -> None:
    data = tmp_path / "held_out.npy"
    np.save(data, np.random.default_rng(2).uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32))
    out = tmp_path / "inspect"
    result = run_cli("inspect", str(tiny_eta), "--out", str(out), "--model", str(tiny_model),
                     "--data", str(data), "--points", "3", "--repeats", "1")
    record = json.loads((out / "summary.json").read_text())

    assert result.returncode == 0, result.stderr
    assert "Loss decrease of calibration on held-out data" in result.stdout
    assert [row["timestep"] for row in record["identity"]] == [0, 50, 99]
    assert all(np.isfinite(row["z"]) for row in record["identity"])
    assert (out / "identity.png").is_file()


def test_inspect_command_errors(tmp_path: Path) -> None:
    bare = tmp_path / "eta.npy"
    np.save(bare, np.zeros((20, 1, 2, 2), dtype=np.float32))
    result = run_cli("inspect", str(bare), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "has no sidecar with its schedule; pass --model" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_cli("inspect", str(bare), "--out", str(tmp_path / "out"), "--rows", "0,a")
    assert result.returncode == 2
    assert "--rows must be comma-separated integers" in result.stderr
