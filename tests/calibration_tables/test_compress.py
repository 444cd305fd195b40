"""Compressed eta tables: knot choice, low rank, the .npz format, and eta at any time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from calibexport.calibration_tables.compress import (
    compress_knots,
    compress_lowrank,
    compress_table_file,
    estimate_eta_at,
    interpolation_bias,
    max_abs_error,
    save_compressed_table,
)
from calibexport.calibration_tables.estimate import estimate_eta
from calibexport.cli import compress as _compress_command  # noqa: F401
from calibexport.cli.app import app
from calibexport.errors import CalibexportError
from calibexport.runtime.eta_table import EtaTable, KnotEta, LowRankEta, load_eta_table
from calibexport.runtime.schedule import DiscreteVPSchedule
from calibexport.testing.gaussian import GaussianData

torch.set_num_threads(1)

IMAGE_SHAPE = (2, 3, 4)


def smooth_table(num_rows: int = 60, seed: int = 0) -> np.ndarray:
    """Rows that change fast at small k and slowly after, like a real eta table."""
    rng = np.random.default_rng(seed)
    k = np.arange(num_rows, dtype=np.float64)[:, None, None, None]
    patterns = rng.standard_normal((3, *IMAGE_SHAPE))
    table = (np.exp(-k / 6.0) * patterns[0] + 0.01 * k * patterns[1]
             + np.sin(k / 15.0) * patterns[2])
    return table.astype(np.float32)


def test_knots_recover_piecewise_linear() -> None:
    rows = np.random.default_rng(1).standard_normal((3, *IMAGE_SHAPE))
    k = np.arange(41, dtype=np.float64)
    weights = np.interp(k, [0, 10, 40], [0, 1, 0]), np.interp(k, [0, 10, 40], [1, 0, 0])
    table = (weights[0][:, None, None, None] * rows[0] + weights[1][:, None, None, None] * rows[1]
             + rows[2]).astype(np.float32)
    form = compress_knots(table, max_error=1e-5)

    assert form.knots.tolist() == [0, 10, 40]
    assert max_abs_error(table, form) <= 1e-5


def test_knots_meet_max_error_and_gather_early() -> None:
    table = smooth_table()
    form = compress_knots(table, max_error=1e-2)
    error = max_abs_error(table, form)

    assert error <= 1e-2
    assert 2 < len(form.knots) < 60
    # The exponential changes fastest at small k, so the first half has more knots.
    assert np.sum(form.knots < 30) > np.sum(form.knots >= 30)


def test_knots_limited_by_count() -> None:
    form = compress_knots(smooth_table(), max_error=0.0, num_knots=5)

    assert len(form.knots) == 5
    assert form.knots[0] == 0
    assert form.knots[-1] == 59


def test_lowrank_recovers_exact_rank() -> None:
    rng = np.random.default_rng(2)
    table = (rng.standard_normal((30, 2)) @ rng.standard_normal((2, 24))).reshape(30, *IMAGE_SHAPE)
    form = compress_lowrank(table.astype(np.float32), max_error=1e-5)

    assert form.rank == 2
    assert max_abs_error(table, form) <= 1e-5


def test_lowrank_meets_max_error_or_rank() -> None:
    table = smooth_table()
    by_error = compress_lowrank(table, max_error=1e-3)
    by_rank = compress_lowrank(table, rank=1)

    assert max_abs_error(table, by_error) <= 1e-3
    assert by_error.rank <= 4
    assert by_rank.rank == 1
    assert max_abs_error(table, by_rank) > 1e-3


@pytest.mark.parametrize("call, message", [
    (lambda table: compress_knots(table), "give a maximum error"),
    (lambda table: compress_lowrank(table, max_error=-1.0), "max_error must be a finite number"),
    (lambda table: compress_knots(table, num_knots=1), "num_knots must be an integer >= 2"),
    (lambda table: compress_lowrank(table, rank=0), "rank must be an integer >= 1"),
    (lambda table: compress_knots(table[:1], num_knots=2), "one row cannot be compressed"),
    (lambda table: compress_lowrank(table[0], rank=1), "eta must be a 4-D float array"),
])
def test_compress_rejects_invalid(call, message: str) -> None:
    with pytest.raises(CalibexportError, match=message):
        call(smooth_table())


@pytest.mark.parametrize("kind", ["knots", "lowrank"])
def test_compressed_at_matches_dense_rule(kind: str) -> None:
    table = smooth_table()
    if kind == "knots":
        form = compress_knots(table, num_knots=7)
    else:
        form = compress_lowrank(table, rank=2)
    dense = EtaTable(values=form.dense())
    times = np.concatenate([np.linspace(-3.0, 62.0, 131), np.arange(60.0)])

    assert np.array_equal(form.at(times), dense.at(times))
    assert np.array_equal(form.at(np.arange(60.0)), form.dense())


def test_knot_rows_between_knots_are_linear() -> None:
    form = compress_knots(smooth_table(), num_knots=4)
    start, end = int(form.knots[1]), int(form.knots[2])
    middle = (start + end) / 2
    expected = 0.5 * (form.rows[1].astype(np.float64) + form.rows[2].astype(np.float64))

    np.testing.assert_allclose(form.at(np.array([middle]))[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["knots", "lowrank"])
def test_compressed_file_round_trip(tmp_path: Path, kind: str) -> None:
    table = smooth_table()
    if kind == "knots":
        form = compress_knots(table, num_knots=9)
    else:
        form = compress_lowrank(table, rank=3)
    path = save_compressed_table(tmp_path / "eta.npz", form, {"compression": {"kind": kind}})
    loaded = load_eta_table(tmp_path)
    sidecar = json.loads((tmp_path / "eta.json").read_text())

    assert path == tmp_path / "eta.npz"
    assert loaded.path == path
    assert loaded.compressed is not None
    assert loaded.compressed.kind == kind
    assert loaded.sha256 == form.sha256
    assert sidecar["eta_sha256"] == form.sha256
    assert np.array_equal(loaded.values, form.dense())
    assert np.array_equal(loaded.at(np.array([2.5, 40.25])), form.at(np.array([2.5, 40.25])))


def test_compressed_file_checks(tmp_path: Path) -> None:
    form = compress_knots(smooth_table(), num_knots=5)
    save_compressed_table(tmp_path / "eta.npz", form, {"compression": {"kind": "lowrank"}})
    with pytest.raises(CalibexportError, match="records compression 'lowrank' but .* is a "
                                               "'knots' table"):
        load_eta_table(tmp_path / "eta.npz")

    sidecar = json.loads((tmp_path / "eta.json").read_text())
    sidecar.update(compression={"kind": "knots"}, eta_sha256="0" * 64)
    (tmp_path / "eta.json").write_text(json.dumps(sidecar))
    with pytest.raises(CalibexportError, match="does not match its sidecar"):
        load_eta_table(tmp_path / "eta.npz")

    np.save(tmp_path / "eta.npy", smooth_table())
    with pytest.raises(CalibexportError, match="contains both eta.npy and eta.npz"):
        load_eta_table(tmp_path)


def test_compressed_file_rejects_bad_archives(tmp_path: Path) -> None:
    np.savez(tmp_path / "kind.npz", kind=np.array("wavelet"), rows=np.zeros(2))
    np.savez(tmp_path / "arrays.npz", kind=np.array("knots"), rows=np.zeros((2, 1, 1, 1)))
    (tmp_path / "broken.npz").write_bytes(b"not a zip file")

    with pytest.raises(CalibexportError, match="has kind 'wavelet'; valid kinds: knots, lowrank"):
        load_eta_table(tmp_path / "kind.npz")
    with pytest.raises(CalibexportError, match=r"contains arrays \['rows'\], expected "
                                               r"\['knots', 'rows'\]"):
        load_eta_table(tmp_path / "arrays.npz")
    with pytest.raises(CalibexportError, match="cannot read compressed eta table"):
        load_eta_table(tmp_path / "broken.npz")
    with pytest.raises(CalibexportError, match="a compressed eta table is a .npz file"):
        save_compressed_table(tmp_path / "eta.npy", compress_lowrank(smooth_table(), rank=1), None)


@pytest.mark.parametrize("knots, message", [
    ([1, 5], "increase strictly from 0"),
    ([0, 3, 3, 9], "increase strictly from 0"),
    ([0], "at least 2 knots"),
])
def test_knot_form_rejects_bad_knots(knots: list[int], message: str) -> None:
    rows = np.zeros((len(knots), *IMAGE_SHAPE), dtype=np.float32)
    with pytest.raises(CalibexportError, match=message):
        KnotEta(knots=np.array(knots, dtype=np.int64), rows=rows)


def test_lowrank_form_rejects_mismatched_factors() -> None:
    with pytest.raises(CalibexportError, match="do not share a rank"):
        LowRankEta(time_factors=np.zeros((5, 2), dtype=np.float32),
                   pixel_factors=np.zeros((3, *IMAGE_SHAPE), dtype=np.float32))
    with pytest.raises(CalibexportError, match="time factors must be a 2-D float32 array"):
        LowRankEta(time_factors=np.zeros((5, 2)),
                   pixel_factors=np.zeros((2, *IMAGE_SHAPE), dtype=np.float32))


def test_compress_command(tmp_path: Path, tiny_eta: Path) -> None:
    out = tmp_path / "knots" / "eta.npz"
    result = CliRunner().invoke(app, ["compress", "--eta", str(tiny_eta), "--out", str(out),
                                      "--kind", "knots", "--max-error", "0", "--num-knots", "10"])
    sidecar = json.loads(out.with_suffix(".json").read_text())
    source = json.loads(tiny_eta.with_suffix(".json").read_text())
    table = load_eta_table(out)

    assert result.exit_code == 0, result.output
    assert "Wrote" in result.output
    assert sidecar["compression"]["kind"] == "knots"
    assert sidecar["compression"]["num_knots"] == 10
    assert sidecar["compression"]["source_eta_sha256"] == source["eta_sha256"]
    assert sidecar["model_weights_sha256"] == source["model_weights_sha256"]
    assert sidecar["compression"]["max_abs_error"] == pytest.approx(
        max_abs_error(np.load(tiny_eta), table.compressed))
    # The CLI logs to stderr, which the runner captures with the output.
    assert "above the requested" in result.output


def test_compress_file_rejects_bad_options(tmp_path: Path, tiny_eta: Path) -> None:
    with pytest.raises(CalibexportError, match="unknown compression kind 'svd'"):
        compress_table_file(tiny_eta, tmp_path / "a.npz", kind="svd", rank=2)
    with pytest.raises(CalibexportError, match="--rank applies to lowrank"):
        compress_table_file(tiny_eta, tmp_path / "a.npz", kind="knots", rank=2)
    compress_table_file(tiny_eta, tmp_path / "b.npz", kind="lowrank", rank=2)
    with pytest.raises(CalibexportError, match="already a 'lowrank' table"):
        compress_table_file(tmp_path / "b.npz", tmp_path / "c.npz", kind="knots", num_knots=3)


# eta at any time: a network that is the exact noise prediction of Gaussian data plus an
# offset that varies smoothly with the model input time, so eta(t) varies smoothly too.
SCHEDULE = DiscreteVPSchedule.linear(beta_start=1e-3, beta_end=0.3, num_timesteps=20)
GAUSSIAN = GaussianData(mean=np.array([0.2]).reshape(1, 1, 1), std=np.array([0.5]).reshape(1, 1, 1))


class SmoothOffsetEps(torch.nn.Module):
    """Exact eps of ``GAUSSIAN`` at any model input time, plus 0.3 * (1 + sin(timestep / 3))."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = SCHEDULE.timestep_to_t(timestep.numpy().astype(np.float64))
        alpha = SCHEDULE.alpha(t).reshape(-1, 1, 1, 1)
        sigma = SCHEDULE.sigma(t).reshape(-1, 1, 1, 1)
        offset = 0.3 * (1.0 + np.sin(timestep.numpy().astype(np.float64) / 3.0))
        eps = GAUSSIAN.eps(x.numpy().astype(np.float64), alpha, sigma)
        return torch.from_numpy((eps + offset.reshape(-1, 1, 1, 1)).astype(np.float32))


@pytest.fixture(scope="module")
def gaussian_images() -> np.ndarray:
    return GAUSSIAN.sample(np.random.default_rng(3), (512, 1, 4, 4))


def test_eta_at_integer_times_equals_table(gaussian_images: np.ndarray) -> None:
    model = SmoothOffsetEps()
    table = estimate_eta(model, SCHEDULE, gaussian_images, num_samples=16, batch_size=40,
                         common_noise=True, progress=False)
    rows = np.array([0, 7, 19])
    direct = estimate_eta_at(model, SCHEDULE, gaussian_images, SCHEDULE.timestep_to_t(rows),
                             num_samples=16, batch_size=40)

    assert np.array_equal(direct.eta, table.eta[rows])
    assert np.array_equal(direct.standard_error, table.standard_error[rows])


def test_interpolation_within_standard_error(gaussian_images: np.ndarray) -> None:
    model = SmoothOffsetEps()
    table = estimate_eta(model, SCHEDULE, gaussian_images, num_samples=64, progress=False)
    between = np.array([0.5, 3.25, 9.5, 17.75])
    bias, direct = interpolation_bias(model, SCHEDULE, gaussian_images, between, num_samples=64)
    lower = np.floor(between).astype(int)
    nearest = estimate_eta_at(model, SCHEDULE, gaussian_images,
                              SCHEDULE.timestep_to_t(np.round(between)), num_samples=64)

    # Linear interpolation stays below the table's standard error in every pixel, while
    # the nearest row would be off by several times more.
    assert np.all(np.abs(bias) <= table.standard_error[lower])
    assert np.mean(np.abs(nearest.eta - direct.eta)) > 4 * np.max(np.abs(bias))
    assert direct.eta.shape == (4, 1, 4, 4)


def test_eta_at_rejects_bad_times(gaussian_images: np.ndarray) -> None:
    for times in (np.array([0.0]), np.array([1.5]), np.array([]), np.array([[0.5]])):
        with pytest.raises(CalibexportError, match="solver times in"):
            estimate_eta_at(SmoothOffsetEps(), SCHEDULE, gaussian_images, times, num_samples=4)
