"""Folding eta into ONNX graphs, checked in ONNX Runtime against the numpy reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from calibexport.errors import CalibexportError
from calibexport.exporter.fold import PREFIX, fold_eta, save_onnx
from calibexport.runtime.eta_table import EtaTable

IMAGE_SHAPE = (1, 8, 8)
NUM_TIMESTEPS = 10


@pytest.fixture
def eta() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(NUM_TIMESTEPS, *IMAGE_SHAPE)).astype(np.float32)


def images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *IMAGE_SHAPE)).astype(np.float32)


def folded_minus_reference(run_onnx, network, eta, x, t) -> float:
    """Max |folded(x, t) - (network(x, t) - eta(t))| with eta(t) from EtaTable.at."""
    folded = fold_eta(network, eta)
    expected = run_onnx(network, x, t) - EtaTable(eta).at(t.astype(np.float64))
    return float(np.max(np.abs(run_onnx(folded, x, t) - expected)))


TIMESTEP_CASES = {
    "integer": [0.0, 3.0, 9.0],
    "non_integer": [0.25, 4.5, 8.75],
    "below_range": [-3.0, -0.5, 0.0],
    "above_range": [9.0, 9.5, 1000.0],
    "mixed": [-1.0, 2.5, 12.0],
}


@pytest.mark.parametrize("case", sorted(TIMESTEP_CASES))
def test_fold_float_timestep_matches_reference(case, eta, make_network, run_onnx):
    t = np.array(TIMESTEP_CASES[case], dtype=np.float32)
    error = folded_minus_reference(run_onnx, make_network(), eta, images(len(t)), t)
    assert error < 1e-6


@pytest.mark.parametrize("batch", [1, 4])
def test_fold_batch_sizes(batch, eta, make_network, run_onnx):
    t = np.linspace(-2, 11, batch).astype(np.float32)
    error = folded_minus_reference(run_onnx, make_network(), eta, images(batch), t)
    assert error < 1e-6


def test_fold_unet_matches_reference(unet_onnx, eta, run_onnx):
    network = onnx.load(unet_onnx)
    t = np.array([0.0, 2.5, 9.0, 40.0], dtype=np.float32)
    error = folded_minus_reference(run_onnx, network, eta, images(4, seed=3), t)
    assert error < 1e-5


def test_fold_unet_keeps_interface(unet_onnx, eta):
    folded = fold_eta(onnx.load(unet_onnx), eta)
    assert [v.name for v in folded.graph.input] == ["x", "t"]
    assert [v.name for v in folded.graph.output] == ["eps"]
    batch_axis = folded.graph.output[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param == "batch"


def test_fold_timestep_above_range_uses_last_row(eta, make_network, run_onnx):
    # An out-of-range Gather returns zeros on TensorRT, so the indices must be clamped.
    t = np.array([10.0, 10.999, 1000.0], dtype=np.float32)
    folded = fold_eta(make_network(), eta)
    x = images(3)
    got = run_onnx(folded, x, t) - run_onnx(make_network(), x, t)
    np.testing.assert_allclose(got, -np.broadcast_to(eta[-1], got.shape), atol=1e-5)


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_fold_integer_input_exact_gather(dtype, eta, make_network, run_onnx):
    network = make_network(timestep_dtype=dtype)
    folded = fold_eta(network, eta)
    t = np.array([-5, 0, 4, 9, 50], dtype=dtype)
    x = images(len(t))
    # Both sides are one float32 subtraction of the same row, so they agree bit for bit.
    expected = run_onnx(network, x, t) - eta[np.clip(t, 0, NUM_TIMESTEPS - 1)]
    np.testing.assert_array_equal(run_onnx(folded, x, t), expected)


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_fold_integer_input_single_gather(dtype, eta, make_network):
    folded = fold_eta(make_network(timestep_dtype=dtype), eta)
    added = [node for node in folded.graph.node if node.name.startswith(PREFIX)]
    assert [node.op_type for node in added].count("Gather") == 1
    assert "Floor" not in {node.op_type for node in added}
    assert folded.graph.input[1].type.tensor_type.elem_type == make_network(
        timestep_dtype=dtype).graph.input[1].type.tensor_type.elem_type


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_fold_keeps_float_timestep_dtype(dtype, eta, make_network, run_onnx):
    network = make_network(timestep_dtype=dtype)
    folded = fold_eta(network, eta)
    assert folded.graph.input[1].type.tensor_type.elem_type == (
        network.graph.input[1].type.tensor_type.elem_type)
    t = np.array([0.5, 3.25, 8.0, 11.0], dtype=dtype)
    error = folded_minus_reference(run_onnx, network, eta, images(len(t)), t)
    assert error < 1e-5


@pytest.mark.parametrize("output_dtype", ["float16", "float64"])
def test_fold_keeps_output_dtype(output_dtype, eta, make_network, run_onnx):
    network = make_network(output_dtype=output_dtype)
    folded = fold_eta(network, eta)
    assert folded.graph.output[0].type.tensor_type.elem_type == (
        network.graph.output[0].type.tensor_type.elem_type)
    t = np.array([1.5, 7.0], dtype=np.float32)
    x = images(2)
    got = run_onnx(folded, x, t)
    expected = run_onnx(network, x, t).astype(np.float64) - EtaTable(eta).at(t)
    assert got.dtype == np.dtype(output_dtype)
    tolerance = 1e-2 if output_dtype == "float16" else 1e-6
    assert np.max(np.abs(got - expected)) < tolerance


def test_fold_output_name_kept_and_network_output_renamed(eta, make_network):
    folded = fold_eta(make_network(), eta)
    producers = [node for node in folded.graph.node if "eps" in node.output]
    assert len(producers) == 1
    assert producers[0].name.startswith(PREFIX)
    assert any(PREFIX + "uncalibrated_eps" in node.output for node in folded.graph.node)


def test_fold_table_stored_as_float32_initializer(eta, make_network):
    folded = fold_eta(make_network(), eta.astype(np.float64))
    tables = [init for init in folded.graph.initializer if init.name == PREFIX + "table"]
    assert len(tables) == 1
    assert tables[0].data_type == TensorProto.FLOAT
    assert list(tables[0].dims) == [NUM_TIMESTEPS, *IMAGE_SHAPE]


def test_fold_passes_checker(eta, make_network):
    folded = fold_eta(make_network(), eta)
    onnx.checker.check_model(folded, full_check=True)


def test_fold_does_not_modify_source(eta, make_network):
    network = make_network()
    before = network.SerializeToString()
    fold_eta(network, eta)
    assert network.SerializeToString() == before


def test_fold_metadata_props(eta, make_network):
    metadata = {"calibexport.prediction_type": "eps", "calibexport.eta_sha256": "abc"}
    folded = fold_eta(make_network(), eta, metadata=metadata)
    props = {prop.key: prop.value for prop in folded.metadata_props}
    assert props["calibexport.prediction_type"] == "eps"
    assert props["calibexport.eta_sha256"] == "abc"


def test_fold_metadata_rejects_non_string(eta, make_network):
    with pytest.raises(CalibexportError, match="metadata entries must be str"):
        fold_eta(make_network(), eta, metadata={"schedule": {"kind": "discrete"}})


def test_fold_twice_rejected(eta, make_network):
    with pytest.raises(CalibexportError, match="folded in already"):
        fold_eta(fold_eta(make_network(), eta), eta)


@pytest.mark.parametrize(
    ("shape", "named"),
    [((NUM_TIMESTEPS, 3, 8, 8), "C: eta has 3, the graph has 1"),
     ((NUM_TIMESTEPS, 1, 16, 8), "H: eta has 16, the graph has 8"),
     ((NUM_TIMESTEPS, 1, 8, 4), "W: eta has 4, the graph has 8")],
)
def test_fold_shape_mismatch_names_dimension(shape, named, make_network):
    with pytest.raises(CalibexportError, match=named):
        fold_eta(make_network(), np.zeros(shape, dtype=np.float32))


def test_fold_rejects_3d_table(make_network):
    with pytest.raises(CalibexportError, match="4-D array"):
        fold_eta(make_network(), np.zeros(IMAGE_SHAPE, dtype=np.float32))


def test_fold_rejects_non_finite_table(eta, make_network):
    eta[4, 0, 2, 2] = np.nan
    with pytest.raises(CalibexportError, match=r"NaN or Inf in rows \[4\]"):
        fold_eta(make_network(), eta)


def test_fold_missing_timestep_input(eta, make_network):
    with pytest.raises(CalibexportError, match="timestep input 'timestep' not found"):
        fold_eta(make_network(), eta, timestep_input="timestep")


def test_fold_missing_output(eta, make_network):
    with pytest.raises(CalibexportError, match="output 'noise' not found"):
        fold_eta(make_network(), eta, output="noise")


def test_fold_old_opset_rejected(eta, make_network):
    with pytest.raises(CalibexportError, match="needs opset 13"):
        fold_eta(make_network(opset=11), eta)


def test_save_onnx_single_file(tmp_path, eta, make_network, run_onnx):
    path = tmp_path / "model.onnx"
    save_onnx(fold_eta(make_network(), eta), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    t = np.array([2.5], dtype=np.float32)
    np.testing.assert_array_equal(run_onnx(str(path), images(1), t),
                                  run_onnx(fold_eta(make_network(), eta), images(1), t))


def test_save_onnx_external_data(tmp_path, eta, make_network, run_onnx):
    path = tmp_path / "model.onnx"
    save_onnx(fold_eta(make_network(), eta), path, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    t = np.array([2.5], dtype=np.float32)
    np.testing.assert_array_equal(run_onnx(str(path), images(1), t),
                                  run_onnx(fold_eta(make_network(), eta), images(1), t))
