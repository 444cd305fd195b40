"""The eta fold for x0 and v networks, timestep input detection, float64 times and subgraphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calibexport.errors import CalibexportError
from calibexport.exporter import onnx_utils
from calibexport.exporter.fold import PREFIX, find_timestep_input, fold_eta
from calibexport.runtime.eta_table import EtaTable
from calibexport.runtime.prediction import alpha_sigma_at_timesteps, table_log_alpha, to_eps
from calibexport.runtime.schedule import DiscreteVPSchedule

IMAGE_SHAPE = (1, 8, 8)
NUM_TIMESTEPS = 10
SCHEDULE = DiscreteVPSchedule.linear(beta_start=1e-3, beta_end=0.2, num_timesteps=NUM_TIMESTEPS)


@pytest.fixture
def eta() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(NUM_TIMESTEPS, *IMAGE_SHAPE)).astype(np.float32)


def images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *IMAGE_SHAPE)).astype(np.float32)


def implied_eps(prediction_type: str, output: np.ndarray, x: np.ndarray,
                timestep: np.ndarray) -> np.ndarray:
    """The eps that ``output`` implies, with alpha and sigma at the clamped timestep."""
    clamped = np.clip(timestep.astype(np.float64), 0, NUM_TIMESTEPS - 1)
    alpha, sigma = alpha_sigma_at_timesteps(SCHEDULE, clamped)
    shape = (-1, 1, 1, 1)
    return to_eps(prediction_type, output.astype(np.float64), x.astype(np.float64),
                  alpha.reshape(shape), sigma.reshape(shape))


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
@pytest.mark.parametrize("timestep_dtype", ["float32", "int64"])
def test_fold_implied_eps_is_eps_minus_eta(prediction_type, timestep_dtype, eta, make_network,
                                           run_onnx):
    network = make_network(timestep_dtype=timestep_dtype)
    folded = fold_eta(network, eta, prediction_type=prediction_type,
                      log_alpha=table_log_alpha(SCHEDULE, NUM_TIMESTEPS))
    values = [0.0, 2.5, 9.0, 12.0] if timestep_dtype == "float32" else [0, 3, 9, 12]
    t = np.array(values, dtype=timestep_dtype)
    x = images(len(t))
    got = implied_eps(prediction_type, run_onnx(folded, x, t), x, t)
    expected = implied_eps(prediction_type, run_onnx(network, x, t), x, t) - EtaTable(eta).at(t)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_fold_x0_output_formula(eta, make_network, run_onnx):
    # The x0 correction is +(sigma/alpha) eta, which is large where alpha is small.
    network = make_network()
    folded = fold_eta(network, eta, prediction_type="x0",
                      log_alpha=table_log_alpha(SCHEDULE, NUM_TIMESTEPS))
    t = np.array([9.0], dtype=np.float32)
    x = images(1)
    alpha, sigma = SCHEDULE.alpha_sigma_at_timesteps()
    expected = run_onnx(network, x, t) + (sigma[9] / alpha[9]) * eta[9]
    np.testing.assert_allclose(run_onnx(folded, x, t), expected, rtol=1e-5, atol=1e-5)


def test_fold_v_output_formula(eta, make_network, run_onnx):
    network = make_network()
    folded = fold_eta(network, eta, prediction_type="v",
                      log_alpha=table_log_alpha(SCHEDULE, NUM_TIMESTEPS))
    t = np.array([4.0], dtype=np.float32)
    x = images(1)
    alpha, _ = SCHEDULE.alpha_sigma_at_timesteps()
    expected = run_onnx(network, x, t) - eta[4] / alpha[4]
    np.testing.assert_allclose(run_onnx(folded, x, t), expected, rtol=1e-5, atol=1e-5)


def test_fold_x0_needs_log_alpha(eta, make_network):
    with pytest.raises(CalibexportError, match="needs the schedule's log_alpha"):
        fold_eta(make_network(), eta, prediction_type="x0")


def test_fold_log_alpha_length_checked(eta, make_network):
    with pytest.raises(CalibexportError, match="log_alpha has 5 entries but eta has 10 rows"):
        fold_eta(make_network(), eta, prediction_type="v", log_alpha=np.full(5, -0.1))


def test_fold_log_alpha_must_be_negative(eta, make_network):
    with pytest.raises(CalibexportError, match="log_alpha must be finite and negative"):
        fold_eta(make_network(), eta, prediction_type="v", log_alpha=np.zeros(NUM_TIMESTEPS))


def test_fold_unknown_prediction_type(eta, make_network):
    with pytest.raises(CalibexportError, match="invalid prediction type 'sample'"):
        fold_eta(make_network(), eta, prediction_type="sample")


def renamed_inputs(model: onnx.ModelProto, renames: dict[str, str]) -> onnx.ModelProto:
    """Rename graph inputs and their uses, for networks exported under other input names."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for value in renamed.graph.input:
        value.name = renames.get(value.name, value.name)
    for node in renamed.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    return renamed


@pytest.mark.parametrize("dtype", ["int32", "int64", "float32", "float64"])
def test_fold_detects_timestep_by_rank_and_dtype(dtype, eta, make_network, run_onnx):
    network = renamed_inputs(make_network(timestep_dtype=dtype),
                             {"x": "sample", "t": "timestep"})
    folded = fold_eta(network, eta)
    assert folded.graph.input[1].name == "timestep"
    assert folded.graph.input[1].type.tensor_type.elem_type == (
        network.graph.input[1].type.tensor_type.elem_type)
    import onnxruntime as ort

    t = np.array([0, 3, 9], dtype=dtype)
    x = images(3)
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"sample": x, "timestep": t})[0]
    base = ort.InferenceSession(network.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = base.run(None, {"sample": x, "timestep": t})[0] - eta[[0, 3, 9]]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def with_extra_input(model: onnx.ModelProto, name: str, elem_type: int,
                     shape: list) -> onnx.ModelProto:
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.input.append(helper.make_tensor_value_info(name, elem_type, shape))
    return extended


def test_fold_ambiguous_timestep_input_rejected(eta, make_network):
    network = with_extra_input(make_network(), "class_label", TensorProto.INT64, ["batch"])
    with pytest.raises(CalibexportError, match="2 have rank 0 or 1.*--timestep-input"):
        fold_eta(network, eta)


def test_fold_named_timestep_input_resolves_ambiguity(eta, make_network):
    network = with_extra_input(make_network(), "class_label", TensorProto.INT64, ["batch"])
    assert find_timestep_input(fold_eta(network, eta, timestep_input="t").graph, "t").name == "t"


def test_fold_missing_named_timestep_lists_inputs(eta, make_network):
    with pytest.raises(CalibexportError, match=r"'sigma' not found.*x \(float \['batch'"):
        fold_eta(make_network(), eta, timestep_input="sigma")


def test_fold_scalar_timestep_input(eta, make_network, run_onnx):
    network = make_network()
    network.graph.input[1].type.tensor_type.shape.ClearField("dim")
    folded = fold_eta(network, eta)
    x = images(2)
    t = np.array(3.5, dtype=np.float32)
    expected = run_onnx(network, x, t) - EtaTable(eta).at(np.array([3.5]))
    np.testing.assert_allclose(run_onnx(folded, x, t), expected, atol=1e-6)


def test_fold_float64_timestep_keeps_weight_precision(make_network, run_onnx):
    # At t near 1000, float32 spacing is 6e-5, so a float32 weight would be off by ~3e-5.
    table = np.random.default_rng(2).normal(size=(1000, *IMAGE_SHAPE)).astype(np.float32)
    network = make_network(timestep_dtype="float64")
    t = np.array([998.1234567891, 500.0000123, 0.3333333333], dtype=np.float64)
    x = images(3)
    expected = run_onnx(network, x, t) - EtaTable(table).at(t)
    np.testing.assert_allclose(run_onnx(fold_eta(network, table), x, t), expected, atol=1e-6)


def network_with_subgraph(make_network) -> onnx.ModelProto:
    """The tiny network plus an If whose branches read ``eps`` by its outer name."""
    model = make_network()
    model.graph.output[0].name = "eps"
    branch_output = helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)
    then_branch = helper.make_graph([helper.make_node("Identity", ["eps"], ["branch_out"])],
                                    "then", [], [branch_output])
    else_branch = helper.make_graph([helper.make_node("Neg", ["eps"], ["branch_out"])],
                                    "else", [], [branch_output])
    model.graph.node.extend([
        helper.make_node("Constant", [], ["condition"],
                         value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["condition"], ["selected"], then_branch=then_branch,
                         else_branch=else_branch),
    ])
    model.graph.output.append(
        helper.make_tensor_value_info("selected", TensorProto.FLOAT, ["batch", *IMAGE_SHAPE]))
    return model


def test_fold_renames_output_inside_subgraphs(eta, make_network):
    folded = fold_eta(network_with_subgraph(make_network), eta, output="eps")
    branch = next(node for node in folded.graph.node if node.op_type == "If").attribute[0].g
    assert branch.node[0].input[0] == PREFIX + "uncalibrated_eps"


def test_large_model_checked_without_weights(monkeypatch, eta, make_network):
    # Past the limit the checks run on a structure-only copy; a broken graph still fails.
    monkeypatch.setattr(onnx_utils, "PROTOBUF_LIMIT_BYTES", 2**26 + 1)
    broken = make_network()
    broken.graph.node[2].input[1] = "missing_value"
    with pytest.raises(CalibexportError, match="folded ONNX graph is invalid"):
        fold_eta(broken, eta)


def test_structure_only_copy_replaces_large_weights(make_network):
    model = make_network()
    weights = onnx.numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), "big")
    model.graph.initializer.append(weights)
    light = onnx_utils.structure_only(model)
    assert "big" not in {tensor.name for tensor in light.graph.initializer}
    assert "big" in {value.name for value in light.graph.input}
    assert {tensor.name for tensor in light.graph.initializer} == {"shape", "scale_t", "scale_x"}


def test_large_model_valid_graph_passes(monkeypatch, eta, make_network, run_onnx):
    monkeypatch.setattr(onnx_utils, "PROTOBUF_LIMIT_BYTES", 2**26 + 1)
    assert onnx_utils.is_large(make_network())
    folded = fold_eta(make_network(), eta)
    t = np.array([1.0], dtype=np.float32)
    np.testing.assert_allclose(run_onnx(folded, images(1), t),
                               run_onnx(make_network(), images(1), t) - eta[1], atol=1e-6)


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_runtime_feeds_integer_timesteps_rounded(tmp_path, dtype, eta, make_network, caplog):
    # The runtime reads the timestep dtype from the graph and rounds solver times to the nearest
    # step: timestep 3.6 evaluates row 4, never the truncated row 3.
    from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from calibexport.runtime.sampler import make_eps_fn

    path = tmp_path / "model.onnx"
    onnx_utils.save_onnx(fold_eta(make_network(timestep_dtype=dtype), eta), path)
    x = images(2)
    with OnnxRuntimeBackend(path) as backend:
        assert backend.timestep_dtype == np.dtype(dtype)
        solver_t = SCHEDULE.timestep_to_t(np.array([3.6, 8.2]))
        got = make_eps_fn(backend, SCHEDULE)(x, solver_t)
        expected = backend.eps(x, np.array([4, 8]))
    np.testing.assert_array_equal(got, expected)
    assert "rounding solver times to the nearest step" in caplog.text
