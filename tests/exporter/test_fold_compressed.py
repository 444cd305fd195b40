"""Folding knot and low-rank eta tables: ONNX Runtime against EtaTable.at, and a real build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from calibexport.calibration_tables.compress import (
    compress_knots,
    compress_lowrank,
    compress_table_file,
)
from calibexport.exporter.fold import PREFIX, fold_eta
from calibexport.exporter.fold_compressed import (
    COMPRESSION_KEY,
    DENSE_TABLE,
    fold_compressed_eta,
    fold_table,
)
from calibexport.runtime.eta_table import EtaTable, load_eta_table
from calibexport.runtime.prediction import table_log_alpha
from calibexport.runtime.schedule import DiscreteVPSchedule

NUM_ROWS = 50
TIMES = np.array([0.0, 3.5, 17.25, 49.0, 60.0, -2.0, 48.9, 12.0])


def smooth_table(num_rows: int = NUM_ROWS) -> np.ndarray:
    rng = np.random.default_rng(0)
    k = np.arange(num_rows, dtype=np.float64)[:, None, None, None]
    patterns = rng.standard_normal((2, 1, 8, 8))
    return (np.exp(-k / 8.0) * patterns[0] + np.cos(k / 9.0) * patterns[1]).astype(np.float32)


FORMS = {
    "knots": compress_knots(smooth_table(), num_knots=9),
    "lowrank": compress_lowrank(smooth_table(), rank=2),
}


def raw_output(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The conftest network: eps = 0.5 x + 0.01 t, in float32."""
    return 0.5 * x + (0.01 * t.astype(np.float32))[:, None, None, None]


@pytest.mark.parametrize("kind", sorted(FORMS))
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32", "int64"])
def test_fold_matches_table_rule(make_network, run_onnx, kind: str, dtype: str) -> None:
    form = FORMS[kind]
    folded = fold_compressed_eta(make_network(timestep_dtype=dtype), form, timestep_input="t")
    times = TIMES.astype(dtype)
    x = np.random.default_rng(1).standard_normal((len(times), 1, 8, 8)).astype(np.float32)
    result = run_onnx(folded, x, times)
    expected = raw_output(x, times) - form.at(times.astype(np.float64))

    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(FORMS))
def test_fold_stores_compressed_arrays(make_network, kind: str) -> None:
    form = FORMS[kind]
    folded = fold_compressed_eta(make_network(), form, timestep_input="t",
                                 metadata={"calibexport.eta_sha256": form.sha256})
    names = {item.name for item in folded.graph.initializer}
    props = {prop.key: prop.value for prop in folded.metadata_props}
    dense = fold_eta(make_network(), form.dense(), timestep_input="t")

    assert DENSE_TABLE not in names
    assert (PREFIX + ("knot_rows" if kind == "knots" else "time_factors")) in names
    assert props[COMPRESSION_KEY] == kind
    assert props["calibexport.eta_sha256"] == form.sha256
    assert folded.ByteSize() < dense.ByteSize()
    onnx.checker.check_model(folded)


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_fold_keeps_prediction_type(make_network, run_onnx, prediction_type: str) -> None:
    form = FORMS["knots"]
    log_alpha = table_log_alpha(DiscreteVPSchedule.linear(1e-3, 0.2, NUM_ROWS), NUM_ROWS)
    options = {"timestep_input": "t", "prediction_type": prediction_type, "log_alpha": log_alpha}
    compressed = fold_compressed_eta(make_network(), form, **options)
    dense = fold_eta(make_network(), form.dense(), **options)
    x = np.random.default_rng(2).standard_normal((len(TIMES), 1, 8, 8)).astype(np.float32)
    times = TIMES.astype(np.float32)

    np.testing.assert_allclose(run_onnx(compressed, x, times), run_onnx(dense, x, times),
                               rtol=0, atol=1e-5)


def test_fold_table_dense_is_fold_eta(make_network) -> None:
    table = EtaTable(values=smooth_table())
    by_table = fold_table(make_network(), table, timestep_input="t")
    by_fold = fold_eta(make_network(), table.values, timestep_input="t")

    assert by_table.SerializeToString() == by_fold.SerializeToString()


@pytest.mark.slow
@pytest.mark.parametrize("kind, option", [("knots", {"num_knots": 12}), ("lowrank", {"rank": 4})])
def test_build_compressed_table(tmp_path: Path, tiny_model: Path, tiny_eta: Path, kind: str,
                                option: dict) -> None:
    from calibexport.exporter.build import BuildOptions, build_artifact
    from calibexport.validate.run import validate_directory

    compressed = compress_table_file(tiny_eta, tmp_path / kind / "eta.npz", kind=kind, **option)
    out = tmp_path / "build"
    result = build_artifact(BuildOptions(model=tiny_model, eta=tmp_path / kind / "eta.npz",
                                         out=out, exporter="torchscript"))
    manifest = json.loads((out / "manifest.json").read_text())
    model = onnx.load(str(out / "model.onnx"))
    table = load_eta_table(out)

    assert result.passed
    assert sorted(manifest["files"]) == ["eta.json", "eta.npz", "model.onnx"]
    assert table.compressed is not None
    assert table.sha256 == compressed["eta_sha256"]
    assert DENSE_TABLE not in {item.name for item in model.graph.initializer}
    assert validate_directory(out)["status"] == "PASSED"
