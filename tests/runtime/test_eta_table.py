"""Tests for the torch-free eta table reader and its interpolation rule."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibexport.errors import CalibexportError
from calibexport.hashing import sha256_array
from calibexport.runtime.eta_table import EtaTable, check_compatible, load_eta_table


def make_values(num_timesteps: int = 5) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((num_timesteps, 2, 3, 4)).astype(np.float32)


def write_table(folder: Path, values: np.ndarray, metadata: dict | None = None) -> Path:
    path = folder / "eta.npy"
    np.save(path, values)
    if metadata is not None:
        (folder / "eta.json").write_text(json.dumps(metadata))
    return path


def test_at_integer_rows_exact() -> None:
    values = make_values()
    table = EtaTable(values=values)
    result = table.at(np.arange(5))

    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, values)
    np.testing.assert_array_equal(table.at(np.array([3.0, 3.0, 0.0])), values[[3, 3, 0]])


def test_at_linear_between_rows() -> None:
    values = make_values()
    table = EtaTable(values=values)
    times = np.array([0.25, 1.5, 3.9, 2.0 + 1e-6])
    result = table.at(times)
    # Per-pixel reference with np.interp over the row index.
    flat = values.reshape(5, -1).astype(np.float64)
    expected = np.stack([np.interp(times, np.arange(5), flat[:, i]) for i in range(flat.shape[1])],
                        axis=1).reshape(4, 2, 3, 4)

    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result[1], 0.5 * (values[1] + values[2]), rtol=0, atol=1e-6)


def test_at_clamps_outside_range() -> None:
    values = make_values()
    table = EtaTable(values=values)
    result = table.at(np.array([-3.0, -1e-3, 4.0, 4.5, 1e6]))

    np.testing.assert_array_equal(result[0], values[0])
    np.testing.assert_array_equal(result[1], values[0])
    np.testing.assert_array_equal(result[2], values[4])
    np.testing.assert_array_equal(result[3], values[4])
    np.testing.assert_array_equal(result[4], values[4])


def test_at_rejects_bad_timesteps() -> None:
    table = EtaTable(values=make_values())
    with pytest.raises(CalibexportError, match=r"timestep must be a 1-D array \[B\]"):
        table.at(np.array(2.0))
    with pytest.raises(CalibexportError, match="non-finite values"):
        table.at(np.array([1.0, np.nan]))


def test_load_with_sidecar(tmp_path: Path) -> None:
    values = make_values()
    path = write_table(tmp_path, values, {"eta_sha256": sha256_array(values), "estimator": "x"})
    table = load_eta_table(path)

    np.testing.assert_array_equal(table.values, values)
    assert table.metadata["estimator"] == "x"
    assert table.path == path
    assert table.sha256 == sha256_array(values)
    assert load_eta_table(tmp_path).path == path


def test_load_bare_npy_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_table(tmp_path, make_values().astype(np.float64))
    with caplog.at_level(logging.INFO, logger="calibexport.runtime.eta_table"):
        table = load_eta_table(path)

    assert table.metadata is None
    assert table.values.dtype == np.float32
    assert "no sidecar" in caplog.text


def test_load_rejects_nan_row(tmp_path: Path) -> None:
    values = make_values()
    values[3, 1, 0, 2] = np.inf
    values[4, 0, 0, 0] = np.nan
    with pytest.raises(CalibexportError, match=r"NaN or Inf, first in row 3 \(2 of 5 rows"):
        load_eta_table(write_table(tmp_path, values))


def test_load_rejects_wrong_ndim(tmp_path: Path) -> None:
    with pytest.raises(CalibexportError, match=r"must be 4-D \[T, C, H, W\], got shape \[5, 24\]"):
        load_eta_table(write_table(tmp_path, make_values().reshape(5, 24)))


def test_load_rejects_integer_dtype(tmp_path: Path) -> None:
    with pytest.raises(CalibexportError, match="dtype int32; it must be float32 or float64"):
        load_eta_table(write_table(tmp_path, np.zeros((2, 1, 1, 1), np.int32)))


def test_load_rejects_truncated_file(tmp_path: Path) -> None:
    path = write_table(tmp_path, make_values())
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CalibexportError, match=f"cannot read eta table {path}.*truncated"):
        load_eta_table(path)


def test_load_rejects_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "eta.npy"
    path.write_bytes(b"not a numpy file at all")
    with pytest.raises(CalibexportError, match=f"cannot read eta table {path}"):
        load_eta_table(path)


def test_load_rejects_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "eta.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibexportError, match=f"cannot read eta table {path}"):
        load_eta_table(path)


def test_load_rejects_hash_mismatch(tmp_path: Path) -> None:
    values = make_values()
    changed = values.copy()
    changed[2, 0, 0, 0] += 1e-3
    path = write_table(tmp_path, changed, {"eta_sha256": sha256_array(values)})
    with pytest.raises(CalibexportError, match="does not match its sidecar: sha256"):
        load_eta_table(path)


def test_load_rejects_bad_sidecars(tmp_path: Path) -> None:
    values = make_values()
    path = write_table(tmp_path, values)
    sidecar = tmp_path / "eta.json"

    sidecar.write_text("{not json")
    with pytest.raises(CalibexportError, match=f"cannot read eta sidecar {sidecar}"):
        load_eta_table(path)
    sidecar.write_text("[1, 2]")
    with pytest.raises(CalibexportError, match="must contain a JSON object, got list"):
        load_eta_table(path)
    sidecar.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CalibexportError, match="format_version 99"):
        load_eta_table(path)
    shape = {"num_timesteps": 6, "channels": 2, "height": 3, "width": 4}
    sidecar.write_text(json.dumps(shape))
    with pytest.raises(CalibexportError, match=r"sidecar records \[6, 2, 3, 4\]"):
        load_eta_table(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CalibexportError, match="eta.npy not found"):
        load_eta_table(tmp_path / "absent")


def test_check_compatible_names_each_dim() -> None:
    table = EtaTable(values=make_values())
    check_compatible(table, (2, 3, 4), 5)

    with pytest.raises(CalibexportError, match="T: table has 5, model needs 1000") as info:
        check_compatible(table, (3, 3, 5), 1000)
    assert "C: table has 2, model needs 3" in str(info.value)
    assert "W: table has 4, model needs 5" in str(info.value)
    assert "H:" not in str(info.value)
    with pytest.raises(CalibexportError, match="^eta table does not fit the model .H: table has 3"):
        check_compatible(table, (2, 8, 4), 5)


def test_module_does_not_import_torch() -> None:
    code = (
        "import sys, calibexport.runtime.eta_table\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
