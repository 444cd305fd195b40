"""Tests for writing eta tables and their sidecars."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

import calibexport
from calibexport.calibration_tables.estimate import EtaEstimate
from calibexport.calibration_tables.table_io import build_sidecar, save_eta_table
from calibexport.errors import CalibexportError
from calibexport.hashing import sha256_array
from calibexport.runtime.eta_table import FORMAT_VERSION, load_eta_table
from calibexport.runtime.schedule import DiscreteVPSchedule

SCHEDULE = DiscreteVPSchedule.linear(num_timesteps=6)


def make_estimate(seed: int = 0) -> EtaEstimate:
    rng = np.random.default_rng(seed)
    return EtaEstimate(
        eta=rng.standard_normal((6, 2, 3, 3)).astype(np.float32),
        standard_error=rng.uniform(0.01, 0.1, (6, 2, 3, 3)).astype(np.float32),
        num_samples=50,
        estimator="control_variate",
        seed=seed,
    )


def make_sidecar(estimate: EtaEstimate) -> dict:
    return build_sidecar(
        estimate,
        schedule=SCHEDULE,
        data_description={"source": "digits", "num_images": 1617},
        weights_sha256="ab" * 32,
    )


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_sidecar_round_trip(tmp_path: Path) -> None:
    estimate = make_estimate()
    save_eta_table(tmp_path / "eta.npy", estimate.eta, make_sidecar(estimate))
    table = load_eta_table(tmp_path / "eta.npy")
    metadata = table.metadata

    np.testing.assert_array_equal(table.values, estimate.eta)
    assert listing(tmp_path) == ["eta.json", "eta.npy"]
    assert metadata["format_version"] == FORMAT_VERSION
    assert metadata["schedule"] == SCHEDULE.to_spec()
    assert [metadata[k] for k in ("num_timesteps", "channels", "height", "width")] == [6, 2, 3, 3]
    assert metadata["data"] == {"source": "digits", "num_images": 1617}
    assert metadata["num_samples"] == 50
    assert metadata["estimator"] == "control_variate"
    assert len(metadata["standard_error"]["row_max"]) == 6
    assert metadata["standard_error"]["max"] == pytest.approx(estimate.standard_error.max())
    assert metadata["model_weights_sha256"] == "ab" * 32
    assert metadata["eta_sha256"] == sha256_array(estimate.eta)
    assert metadata["eta_sha256"] == table.sha256
    assert metadata["calibexport_version"] == calibexport.__version__
    assert metadata["torch_version"]
    assert datetime.fromisoformat(metadata["created_utc"]).utcoffset().total_seconds() == 0


def test_folder_path_writes_eta_npy(tmp_path: Path) -> None:
    estimate = make_estimate()
    save_eta_table(tmp_path / "table", estimate.eta, make_sidecar(estimate))

    assert listing(tmp_path / "table") == ["eta.json", "eta.npy"]
    np.testing.assert_array_equal(load_eta_table(tmp_path / "table").values, estimate.eta)


def failing_save(*args: object, **kwargs: object) -> None:
    raise OSError("disk full")


def test_failed_save_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    estimate = make_estimate()
    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_eta_table(tmp_path / "eta.npy", estimate.eta, make_sidecar(estimate))

    assert listing(tmp_path) == []


def test_failed_save_keeps_old_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = make_estimate(seed=1)
    save_eta_table(tmp_path / "eta.npy", old.eta, make_sidecar(old))
    new = make_estimate(seed=2)
    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_eta_table(tmp_path / "eta.npy", new.eta, make_sidecar(new))

    assert listing(tmp_path) == ["eta.json", "eta.npy"]
    np.testing.assert_array_equal(load_eta_table(tmp_path / "eta.npy").values, old.eta)


def test_unserialisable_sidecar_keeps_old(tmp_path: Path) -> None:
    old = make_estimate(seed=1)
    save_eta_table(tmp_path / "eta.npy", old.eta, make_sidecar(old))
    new = make_estimate(seed=2)
    metadata = make_sidecar(new)
    metadata["data"]["bad"] = float("nan")
    with pytest.raises(ValueError, match="JSON"):
        save_eta_table(tmp_path / "eta.npy", new.eta, metadata)

    assert listing(tmp_path) == ["eta.json", "eta.npy"]
    np.testing.assert_array_equal(load_eta_table(tmp_path / "eta.npy").values, old.eta)


def test_save_without_metadata_drops_sidecar(tmp_path: Path) -> None:
    old = make_estimate(seed=1)
    save_eta_table(tmp_path / "eta.npy", old.eta, make_sidecar(old))
    new = make_estimate(seed=2)
    save_eta_table(tmp_path / "eta.npy", new.eta, None)

    assert listing(tmp_path) == ["eta.npy"]
    assert load_eta_table(tmp_path / "eta.npy").metadata is None


def test_save_rejects_other_tables_sidecar(tmp_path: Path) -> None:
    metadata = make_sidecar(make_estimate(seed=1))
    with pytest.raises(CalibexportError, match="records eta_sha256"):
        save_eta_table(tmp_path / "eta.npy", make_estimate(seed=2).eta, metadata)
    metadata.pop("eta_sha256")
    with pytest.raises(CalibexportError, match="records num_timesteps=6"):
        save_eta_table(tmp_path / "eta.npy", np.zeros((5, 2, 3, 3), np.float32), metadata)
    assert listing(tmp_path) == []


def test_save_fills_missing_hash(tmp_path: Path) -> None:
    eta = make_estimate().eta
    save_eta_table(tmp_path / "eta.npy", eta, {"note": "hand-made"})
    written = json.loads((tmp_path / "eta.json").read_text())

    assert written["eta_sha256"] == sha256_array(eta)
    assert written["num_timesteps"] == 6
    assert written["note"] == "hand-made"


def test_save_rejects_invalid_arrays(tmp_path: Path) -> None:
    with_nan = np.zeros((4, 1, 2, 2), np.float32)
    with_nan[2, 0, 1, 1] = np.nan
    with pytest.raises(CalibexportError, match="row 2 contains NaN or Inf"):
        save_eta_table(tmp_path / "eta.npy", with_nan, None)
    with pytest.raises(CalibexportError, match=r"must be 4-D \[T, C, H, W\], got shape \[4, 2\]"):
        save_eta_table(tmp_path / "eta.npy", np.zeros((4, 2), np.float32), None)
    with pytest.raises(CalibexportError, match="dtype int64 is not a floating type"):
        save_eta_table(tmp_path / "eta.npy", np.zeros((4, 1, 2, 2), np.int64), None)
    assert listing(tmp_path) == []


def test_save_casts_float64(tmp_path: Path) -> None:
    eta = make_estimate().eta.astype(np.float64)
    save_eta_table(tmp_path / "eta.npy", eta, None)

    assert np.load(tmp_path / "eta.npy").dtype == np.float32
