"""Property-based tests (hypothesis) for the eta table format, the eta fold and the schedules."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper

from calibexport.calibration_tables.data import load_data
from calibexport.calibration_tables.table_io import save_eta_table
from calibexport.errors import CalibexportError
from calibexport.exporter.fold import fold_eta
from calibexport.hashing import sha256_array
from calibexport.runtime.eta_table import SIDECAR_FORMAT, EtaTable, load_eta_table
from calibexport.runtime.schedule import DiscreteVPSchedule, LinearVPSchedule

FAST = settings(max_examples=40, deadline=None)

table_shapes = st.tuples(st.integers(1, 12), st.integers(1, 3), st.integers(1, 4),
                         st.integers(1, 4))


@st.composite
def tables(draw, max_magnitude: float = 1e3) -> np.ndarray:
    """Draw a finite table [T, C, H, W] in float32 or float64."""
    shape = draw(table_shapes)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    elements = st.floats(-max_magnitude, max_magnitude, allow_nan=False, allow_infinity=False,
                         width=32 if dtype == np.float32 else 64)
    return draw(arrays(dtype, shape, elements=elements))


def save_with_sidecar(directory: Path, values: np.ndarray) -> Path:
    path = directory / "eta.npy"
    save_eta_table(path, values, {"format": SIDECAR_FORMAT, "format_version": 1})
    return path


# Table format ----------------------------------------------------------------------------------


@FAST
@given(values=tables())
def test_table_round_trip_is_exact(values):
    expected = values.astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        table = load_eta_table(save_with_sidecar(Path(tmp), values))

    np.testing.assert_array_equal(table.values, expected)
    assert table.values.dtype == np.float32
    assert table.sha256 == sha256_array(expected)
    assert table.metadata["eta_sha256"] == table.sha256
    dims = [table.metadata[key] for key in ("num_timesteps", "channels", "height", "width")]
    assert dims == list(values.shape)


@FAST
@given(values=tables(), data=st.data())
def test_truncated_table_never_loads(values, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = save_with_sidecar(Path(tmp), values)
        content = path.read_bytes()
        cut = data.draw(st.integers(0, len(content) - 1), label="cut")
        path.write_bytes(content[:cut])
        with pytest.raises(CalibexportError):
            load_eta_table(path)


@FAST
@given(values=tables(), data=st.data())
def test_changed_byte_never_loads_wrong_values(values, data):
    # With a sidecar, one changed byte either raises or leaves the values unchanged (padding).
    with tempfile.TemporaryDirectory() as tmp:
        path = save_with_sidecar(Path(tmp), values)
        content = bytearray(path.read_bytes())
        position = data.draw(st.integers(0, len(content) - 1), label="position")
        content[position] ^= data.draw(st.integers(1, 255), label="xor")
        path.write_bytes(bytes(content))
        try:
            loaded = load_eta_table(path)
        except CalibexportError:
            return
    np.testing.assert_array_equal(loaded.values, values.astype(np.float32))


@FAST
@given(values=tables(), data=st.data())
def test_table_lookup_rows_and_clamp(values, data):
    table = EtaTable(values.astype(np.float32))
    last = table.num_timesteps - 1
    rows = data.draw(st.lists(st.integers(0, last), min_size=1, max_size=5), label="rows")
    below = data.draw(st.floats(-1e6, 0.0), label="below")
    above = data.draw(st.floats(float(last), 1e6), label="above")

    np.testing.assert_array_equal(table.at(np.array(rows, dtype=np.float64)), table.values[rows])
    np.testing.assert_array_equal(table.at(np.array([below])), table.values[[0]])
    np.testing.assert_array_equal(table.at(np.array([above])), table.values[[last]])


@FAST
@given(compressed=st.booleans(), data=st.data())
def test_damaged_data_file_raises_calibexport_error(compressed, data):
    # Whatever the damage, loading either succeeds or raises the one user-facing error type.
    images = np.random.default_rng(0).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("images.npz" if compressed else "images.npy")
        if compressed:
            np.savez_compressed(path, images=images)
        else:
            np.save(path, images)
        content = bytearray(path.read_bytes())
        cut = data.draw(st.integers(1, len(content)), label="cut")
        position = data.draw(st.integers(0, cut - 1), label="position")
        content[position] ^= data.draw(st.integers(0, 255), label="xor")
        path.write_bytes(bytes(content[:cut]))
        try:
            loaded = load_data(path, channels=1, resolution=8)
        except CalibexportError:
            return
    assert loaded.shape == (4, 1, 8, 8)


# The eta fold -----------------------------------------------------------------------------------

TIMESTEP_TYPES = {
    np.float32: TensorProto.FLOAT,
    np.float64: TensorProto.DOUBLE,
    np.int32: TensorProto.INT32,
    np.int64: TensorProto.INT64,
}


def identity_network(timestep_type: int, image_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Build eps = x with a timestep input t [B], so the folded output is x - eta(t)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["eps"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *image_shape]),
         helper.make_tensor_value_info("t", timestep_type, ["batch"])],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", *image_shape])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@st.composite
def timesteps(draw, num_rows: int, dtype: type, batch: int) -> np.ndarray:
    """Draw [batch] model input times around [0, T-1]: both ends, interior and outside values."""
    last = num_rows - 1
    if np.issubdtype(dtype, np.integer):
        values = st.one_of(st.sampled_from([0, last]), st.integers(-5, last + 5))
    else:
        # float32-representable values, so float32 and float64 inputs see the same times.
        values = st.one_of(st.sampled_from([0.0, float(last), last - 0.5, 0.25]),
                           st.floats(-5.0, last + 5.0, width=32))
    return np.array(draw(st.lists(values, min_size=batch, max_size=batch)), dtype=dtype)


@FAST
@given(eta=tables(max_magnitude=10.0), data=st.data())
def test_fold_matches_table_lookup(eta, data):
    import onnxruntime as ort

    batch = data.draw(st.integers(1, 5), label="batch")
    dtype = data.draw(st.sampled_from(sorted(TIMESTEP_TYPES, key=str)), label="dtype")
    t = data.draw(timesteps(eta.shape[0], dtype, batch), label="t")
    x = data.draw(arrays(np.float32, (batch, *eta.shape[1:]),
                         elements=st.floats(-10, 10, width=32)), label="x")

    folded = fold_eta(identity_network(TIMESTEP_TYPES[dtype], eta.shape[1:]), eta)
    session = ort.InferenceSession(folded.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    output = session.run(None, {"x": x, "t": t})[0]

    expected = x - EtaTable(eta.astype(np.float32)).at(t.astype(np.float64))
    assert output.shape == x.shape
    assert output.dtype == np.float32
    # Both sides compute the same float32 operations in the same order (weight, then
    # lo + w * (hi - lo), then x - eta), so ONNX Runtime on the CPU matches bit for bit.
    np.testing.assert_array_equal(output, expected)


# Schedule conversions ---------------------------------------------------------------------------


@st.composite
def discrete_schedules(draw) -> DiscreteVPSchedule:
    num_timesteps = draw(st.integers(2, 1000), label="N")
    beta_start = draw(st.floats(1e-5, 1e-2), label="beta_start")
    beta_end = draw(st.floats(beta_start, 0.05), label="beta_end")
    return DiscreteVPSchedule.linear(beta_start, beta_end, num_timesteps)


@st.composite
def linear_schedules(draw) -> LinearVPSchedule:
    beta_0 = draw(st.floats(0.01, 1.0), label="beta_0")
    beta_1 = draw(st.floats(beta_0 + 1.0, 30.0), label="beta_1")
    return LinearVPSchedule(beta_0=beta_0, beta_1=beta_1)


schedules = st.one_of(discrete_schedules(), linear_schedules())


def solver_times(schedule, draw) -> np.ndarray:
    """Draw sorted solver times in [t_end, 1], including both ends, at least 1e-6 apart."""
    low = schedule.default_t_end
    inner = draw(st.lists(st.floats(low, 1.0), min_size=1, max_size=20), label="t")
    times = np.unique(np.array([low, 1.0, *inner], dtype=np.float64))
    return times[np.concatenate([[True], np.diff(times) > 1e-6])]


@FAST
@given(schedule=schedules, data=st.data())
def test_lambda_inverse_round_trip(schedule, data):
    t = solver_times(schedule, data.draw)
    lambda_t = schedule.lambda_(t)
    recovered = schedule.inverse_lambda(lambda_t)

    assert np.all(np.isfinite(lambda_t))
    np.testing.assert_allclose(recovered, t, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(schedule.lambda_(recovered), lambda_t, rtol=1e-9, atol=1e-9)


@FAST
@given(schedule=schedules, data=st.data())
def test_lambda_decreases_and_alpha_sigma_normalised(schedule, data):
    t = solver_times(schedule, data.draw)
    assume(len(t) >= 2)
    lambda_t = schedule.lambda_(t)
    alpha = schedule.alpha(t)
    sigma = schedule.sigma(t)

    assert np.all(np.diff(lambda_t) < 0)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=0, atol=1e-12)
    assert np.all((alpha > 0) & (alpha < 1))
    assert np.all((sigma > 0) & (sigma < 1))


@FAST
@given(schedule=discrete_schedules(), data=st.data())
def test_discrete_timestep_round_trip(schedule, data):
    n = schedule.num_timesteps
    steps = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=10)))
    fractional = data.draw(st.floats(0.0, float(n - 1)), label="fractional")
    t = schedule.timestep_to_t(steps)

    np.testing.assert_allclose(t, (steps + 1) / n, rtol=1e-15)
    np.testing.assert_allclose(schedule.t_to_timestep(t), steps, rtol=0, atol=1e-9)
    # At its own grid time, log_alpha is the table value of that integer step.
    np.testing.assert_allclose(schedule.log_alpha(t), schedule.log_alpha_array[steps],
                               rtol=1e-12, atol=1e-15)
    back = schedule.t_to_timestep(schedule.timestep_to_t(np.array([fractional])))
    np.testing.assert_allclose(back, [fractional], rtol=0, atol=1e-9)


@FAST
@given(schedule=linear_schedules(), data=st.data())
def test_linear_timestep_round_trip(schedule, data):
    t = data.draw(st.floats(schedule.t_shift, 1.0), label="t")
    timestep = schedule.t_to_timestep(np.array([t]))
    below = schedule.t_to_timestep(np.array([schedule.t_shift / 2]))

    np.testing.assert_allclose(schedule.timestep_to_t(timestep), [t], rtol=1e-12, atol=1e-15)
    assert 0.0 <= timestep[0] <= schedule.timestep_scale
    assert below[0] == 0.0
