"""TensorRT engine builds: ONNX inspection, the build step's messages and Polygraphy repro files.

Tests marked ``gpu`` build real engines and skip, naming what is missing, on hosts without
TensorRT 10+ or an NVIDIA GPU. The others run everywhere.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from calibexport.errors import CalibexportError
from calibexport.exporter.engine_cache import (
    ENGINE_FILENAME,
    ENGINE_METADATA_FILENAME,
    TIMING_CACHE_FILENAME,
    BatchProfile,
    current_host_facts,
    read_engine_metadata,
)
from calibexport.exporter.tensorrt_engine import (
    EngineBuildOptions,
    MatchedEvaluations,
    batch_input_shapes,
    build_engine,
    build_engine_step,
    inspect_onnx,
    onnx_precision,
    save_polygraphy_repro,
    tensorrt_incompatibilities,
    tensorrt_unavailable_reason,
    validate_tensorrt,
)
from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from calibexport.runtime.backends.tensorrt import tensorrt_dtype_name, tensorrt_version_problem
from calibexport.runtime.schedule import schedule_from_spec
from calibexport.validate.compare import Tolerance
from calibexport.validate.parity import ParityConfig

TENSORRT_MISSING = tensorrt_unavailable_reason()
requires_tensorrt = pytest.mark.skipif(
    TENSORRT_MISSING is not None, reason=f"needs TensorRT 10+ and an NVIDIA GPU: {TENSORRT_MISSING}"
)
NUM_TIMESTEPS = 10
SCHEDULE = {"kind": "discrete", "beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.2,
            "num_timesteps": NUM_TIMESTEPS}


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def small_parity_config(atol: float = 1e-4) -> ParityConfig:
    tolerance = Tolerance(atol=atol, rtol=atol)
    return ParityConfig(tolerances={"evaluation": tolerance, "trajectory": tolerance,
                                    "samples": tolerance},
                        tolerance_preset="test", num_non_integer=4, num_samples=1)


def test_precision_of_float32_network(make_network):
    assert onnx_precision(make_network()) == "float32"
    assert onnx_precision(make_network(timestep_dtype="int64")) == "float32"


def test_precision_of_float16_output(make_network):
    assert onnx_precision(make_network(output_dtype="float16")) == "float16+float32"


def test_precision_of_exported_unet(unet_onnx):
    assert onnx_precision(onnx.load(unet_onnx)) == "float32"


def test_float64_input_names_tensor(make_network):
    problems = tensorrt_incompatibilities(make_network(timestep_dtype="float64"))
    assert problems == ["input 't' has type float64"]


def test_float64_cast_names_tensor(make_network):
    problems = tensorrt_incompatibilities(make_network(output_dtype="float64"))
    assert "output 'eps' has type float64" in problems
    assert "Cast node '(unnamed)' makes tensor 'eps' float64" in problems


def test_int64_timestep_is_compatible(make_network):
    assert tensorrt_incompatibilities(make_network(timestep_dtype="int64")) == []
    assert tensorrt_incompatibilities(make_network(timestep_dtype="int32")) == []


def test_batch_input_shapes(make_network, unet_onnx):
    assert batch_input_shapes(make_network()) == {"x": (-1, 1, 8, 8), "t": (-1,)}
    assert batch_input_shapes(onnx.load(unet_onnx)) == {"x": (-1, 1, 8, 8), "t": (-1,)}


def test_static_batch_axis_rejected(make_network):
    model = make_network()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(CalibexportError, match=r"input 'x' of the ONNX graph has a static batch "
                       r"axis \(2\); re-export it with a dynamic batch axis"):
        batch_input_shapes(model)


def test_dynamic_image_axis_rejected(make_network):
    model = make_network()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    with pytest.raises(CalibexportError, match=r"input 'x' .* dynamic axes beyond the batch axis "
                       r"\(\['batch', 1, 'height', 8\]\)"):
        batch_input_shapes(model)


def test_inspect_onnx_reports_digest_and_shapes(make_network, tmp_path):
    path = save(make_network(timestep_dtype="int64"), tmp_path / "model.onnx")
    info = inspect_onnx(path)
    assert info.precision == "float32"
    assert info.input_shapes == {"x": (-1, 1, 8, 8), "t": (-1,)}
    assert len(info.sha256) == 64


def test_inspect_onnx_rejects_float64_before_tensorrt(make_network, tmp_path):
    path = save(make_network(timestep_dtype="float64"), tmp_path / "model.onnx")
    with pytest.raises(CalibexportError, match=r"cannot become a TensorRT engine: input 't' has "
                       r"type float64\. Export the network with float32 or int32/int64"):
        inspect_onnx(path)
    with pytest.raises(CalibexportError, match="ONNX model not found"):
        inspect_onnx(tmp_path / "missing.onnx")


def test_tensorrt_dtype_names():
    assert tensorrt_dtype_name("FLOAT") == "float32"
    assert tensorrt_dtype_name("DataType.HALF") == "float16"
    assert tensorrt_dtype_name("INT64") == "int64"
    assert tensorrt_dtype_name("INT32") == "int32"
    with pytest.raises(CalibexportError, match="unknown TensorRT data type"):
        tensorrt_dtype_name("DOUBLE")


def test_tensorrt_version_check():
    assert tensorrt_version_problem("10.3.0.26") is None
    assert tensorrt_version_problem("11.0.0") is None
    assert "needs TensorRT 10 or newer" in tensorrt_version_problem("8.6.1")
    assert "cannot read the TensorRT version" in tensorrt_version_problem("unknown")


def test_default_build_options():
    options = EngineBuildOptions()
    assert options.profile == BatchProfile(1, 8, 64)
    assert options.tf32 is False
    assert options.cache_dir is None


@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT and a GPU are present here")
def test_unavailable_reason_names_missing_part():
    assert "tensorrt" in TENSORRT_MISSING.lower() or "nvidia-smi" in TENSORRT_MISSING


@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT and a GPU are present here")
def test_build_without_tensorrt_explains(make_network, tmp_path):
    path = save(make_network(), tmp_path / "model.onnx")
    with pytest.raises(CalibexportError, match="cannot build a TensorRT engine: "):
        build_engine(path, tmp_path / "engine", eta_sha256="0" * 64)
    assert not (tmp_path / "engine" / ENGINE_FILENAME).exists()


@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT and a GPU are present here")
def test_build_step_logs_why_skipped(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="calibexport.exporter.tensorrt_engine"):
        assert build_engine_step(tmp_path, batch_sizes="1,4,16") is None
    messages = [record.getMessage() for record in caplog.records]
    skipped = [m for m in messages if m.startswith("TensorRT engine skipped: ")]
    assert len(skipped) == 1
    assert skipped[0].endswith(". The ONNX artifact is complete.")
    assert "--batch-sizes 1,4,16 has no effect because no engine is built." in messages


def test_build_step_disabled(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="calibexport.exporter.tensorrt_engine"):
        assert build_engine_step(tmp_path, enabled=False) is None
    assert "TensorRT engine skipped (--no-engine)" in caplog.text


def test_build_step_rejects_bad_batch_sizes(tmp_path):
    with pytest.raises(CalibexportError, match=r"MIN <= OPT <= MAX, got 8,1,16"):
        build_engine_step(tmp_path, batch_sizes="8,1,16")


def test_matched_evaluations_keep_worst():
    matches = MatchedEvaluations(keep=2)
    t = np.array([3.0], dtype=np.float32)
    for value, error in ((1.0, 0.5), (2.0, 0.1), (3.0, 2.0)):
        x = np.full((1, 1, 2, 2), value, dtype=np.float32)
        matches.add("deployed", x, t, x + error)
        matches.add("reference", x, t, x)
    assert [round(item[0], 6) for item in matches.worst] == [2.0, 0.5]
    assert matches.worst[0][1][0, 0, 0, 0] == 3.0
    # The reference output is kept, not the deployed one.
    np.testing.assert_array_equal(matches.worst[0][3], matches.worst[0][1])


def test_matched_evaluations_pair_in_either_order():
    matches = MatchedEvaluations(keep=4)
    x = np.zeros((1, 1, 2, 2), dtype=np.float32)
    t = np.array([1], dtype=np.int64)
    matches.add("reference", x, t, x)
    matches.add("reference", x + 1, t, x)
    assert matches.worst == []
    matches.add("deployed", x, t, x + np.nan)
    assert len(matches.worst) == 1
    assert matches.worst[0][0] == float("inf")
    # Same x with another timestep dtype is another input.
    matches.add("deployed", x + 1, t.astype(np.int32), x)
    assert len(matches.worst) == 1


def _perturbed(model: onnx.ModelProto, scale_t: float) -> onnx.ModelProto:
    """Return a copy of the test network with another timestep coefficient."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == "scale_t":
            model.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(np.array(scale_t, dtype=np.float32), "scale_t"))
    return model


def _polygraphy(*args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "polygraphy"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_validation_saves_repro_that_polygraphy_reruns(make_network, tmp_path):
    deployed_path = save(make_network(), tmp_path / "deployed.onnx")
    reference_path = save(_perturbed(make_network(), 0.011), tmp_path / "reference.onnx")
    schedule = schedule_from_spec(SCHEDULE)
    repro = tmp_path / "repro"
    with OnnxRuntimeBackend(deployed_path) as deployed, \
            OnnxRuntimeBackend(reference_path) as reference:
        result, files = validate_tensorrt(deployed, reference, schedule, NUM_TIMESTEPS,
                                          small_parity_config(), repro_dir=repro,
                                          repro_evaluations=3, model_path=deployed_path)
    assert not result.passed
    assert files["num_iterations"] == 3
    assert files["directory"] == str(repro)
    assert Path(files["inputs"]).is_file()
    assert Path(files["outputs"]).is_file()
    assert files["command"].startswith(f"polygraphy run {deployed_path} --trt --strongly-typed")
    assert "--trt-max-shapes 'x:[" in files["command"]
    iterations = json.loads(Path(files["iterations"]).read_text())
    assert [item["iteration"] for item in iterations] == [0, 1, 2]
    errors = [item["max_abs_error"] for item in iterations]
    assert errors == sorted(errors, reverse=True)
    assert errors[0] > 1e-4

    # The saved inputs and outputs are in Polygraphy's formats: its ONNX Runtime runner matches
    # the reference model and finds the deployed model's error on exactly these inputs.
    loads = ["--load-inputs", files["inputs"], "--load-outputs", files["outputs"],
             "--atol", "1e-4", "--rtol", "1e-4"]
    assert _polygraphy("run", str(reference_path), "--onnxrt", *loads).returncode == 0
    failed = _polygraphy("run", str(deployed_path), "--onnxrt", *loads)
    assert failed.returncode != 0
    assert "FAILED" in failed.stdout + failed.stderr


def test_repro_keeps_the_largest_errors(make_network, tmp_path):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    deployed_path = save(make_network(), tmp_path / "deployed.onnx")
    reference_path = save(_perturbed(make_network(), 0.011), tmp_path / "reference.onnx")
    with OnnxRuntimeBackend(deployed_path) as deployed, \
            OnnxRuntimeBackend(reference_path) as reference:
        matches = MatchedEvaluations(keep=2)
        from calibexport.exporter.tensorrt_engine import RecordingBackend

        recorded_deployed = RecordingBackend(deployed, matches, "deployed")
        recorded_reference = RecordingBackend(reference, matches, "reference")
        x = np.zeros((2, 1, 8, 8), dtype=np.float32)
        for timestep in (1.0, 9.0, 5.0):
            t = np.full(2, timestep)
            recorded_deployed.eps(x, t)
            recorded_reference.eps(x, t)
    files = save_polygraphy_repro(tmp_path, matches, x_input="x", timestep_input="t",
                                  output_name="eps", atol=1e-4, rtol=1e-4,
                                  profile=BatchProfile(1, 2, 4))
    feeds = load_json(files["inputs"])
    assert [float(feed["t"][0]) for feed in feeds] == [9.0, 5.0]
    assert feeds[0]["t"].dtype == np.float32
    results = RunResults.load(files["outputs"])
    outputs = results["reference"]
    assert len(outputs) == 2
    np.testing.assert_allclose(outputs[0]["eps"], np.full((2, 1, 8, 8), 0.011 * 9.0), rtol=1e-6)
    assert "--trt-min-shapes 'x:[1,1,8,8]' 't:[1]'" in files["command"]
    assert "--trt-opt-shapes 'x:[2,1,8,8]' 't:[2]'" in files["command"]
    assert "--trt-max-shapes 'x:[4,1,8,8]' 't:[4]'" in files["command"]
    assert files["command"].startswith("polygraphy run model.onnx --trt")


# --- GPU: real TensorRT builds -------------------------------------------------------------


@pytest.mark.gpu
@requires_tensorrt
@pytest.mark.parametrize("timestep_dtype", ["float32", "int32", "int64"])
def test_engine_built_with_metadata(make_network, tmp_path, timestep_dtype):
    import tensorrt

    path = save(make_network(timestep_dtype=timestep_dtype), tmp_path / "model.onnx")
    out = tmp_path / "engine"
    metadata = build_engine(path, out, eta_sha256="e" * 64,
                            options=EngineBuildOptions(profile=BatchProfile(1, 4, 8)))
    assert (out / ENGINE_FILENAME).is_file()
    assert (out / TIMING_CACHE_FILENAME).stat().st_size > 0
    assert read_engine_metadata(out) == metadata
    host = current_host_facts(tensorrt.__version__)
    assert metadata.key.gpu_name == host.gpu_name
    assert metadata.key.compute_capability == host.compute_capability
    assert metadata.key.tensorrt_version == tensorrt.__version__
    assert metadata.key.profile == BatchProfile(1, 4, 8)
    assert metadata.key.precision == "float32"
    assert metadata.key.tf32 is False
    assert metadata.inputs()["t"]["dtype"] == timestep_dtype
    assert metadata.inputs()["x"]["shape"] == [-1, 1, 8, 8]
    assert metadata.outputs()["eps"]["dtype"] == "float32"


@pytest.mark.gpu
@requires_tensorrt
def test_engine_cache_reuses_build(make_network, tmp_path, caplog):
    path = save(make_network(), tmp_path / "model.onnx")
    options = EngineBuildOptions(profile=BatchProfile(1, 2, 4), cache_dir=tmp_path / "cache")
    first = build_engine(path, tmp_path / "first", eta_sha256="e" * 64, options=options)
    with caplog.at_level(logging.INFO, logger="calibexport.exporter.engine_cache"):
        second = build_engine(path, tmp_path / "second", eta_sha256="e" * 64, options=options)
    assert "Reusing the cached TensorRT engine" in caplog.text
    assert second == first
    plan = (tmp_path / "first" / ENGINE_FILENAME).read_bytes()
    assert (tmp_path / "second" / ENGINE_FILENAME).read_bytes() == plan
    assert (tmp_path / "second" / TIMING_CACHE_FILENAME).is_file()
    # Another eta digest is another key: a new build, never the cached engine.
    third = build_engine(path, tmp_path / "third", eta_sha256="f" * 64, options=options)
    assert third.key.eta_sha256 == "f" * 64


@pytest.mark.gpu
@requires_tensorrt
def test_artifact_build_writes_engine(tiny_artifact):
    metadata = read_engine_metadata(tiny_artifact)
    assert (tiny_artifact / ENGINE_FILENAME).is_file()
    assert (tiny_artifact / ENGINE_METADATA_FILENAME).is_file()
    assert (tiny_artifact / TIMING_CACHE_FILENAME).is_file()
    assert metadata.key.profile == BatchProfile(1, 8, 64)


@pytest.mark.gpu
@requires_tensorrt
def test_tensorrt_matches_onnxruntime_parity(tiny_artifact, tmp_path):
    from calibexport.runtime.artifact import load_manifest
    from calibexport.runtime.backends.tensorrt import TensorRTBackend

    manifest = load_manifest(tiny_artifact)
    schedule = schedule_from_spec(manifest.schedule)
    with TensorRTBackend.from_artifact(tiny_artifact) as deployed, \
            OnnxRuntimeBackend(tiny_artifact / "model.onnx") as reference:
        result, files = validate_tensorrt(deployed, reference, schedule, manifest.num_timesteps,
                                          small_parity_config(atol=5e-4),
                                          repro_dir=tmp_path / "repro")
    failed = [check.failure_message() for check in result.checks if not check.passed]
    assert failed == []
    assert Path(files["inputs"]).is_file()


# --- The build command ----------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibexport", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("batch_sizes, message", [
    ("8,1,16", r"MIN <= OPT <= MAX, got 8,1,16"),
    ("1,8", "expected three comma-separated integers"),
    ("0,1,2", "must be positive integers"),
])
def test_build_cli_rejects_bad_batch_sizes(tmp_path, batch_sizes, message):
    from typer.testing import CliRunner

    import calibexport.cli.build  # noqa: F401  (registers the command)
    from calibexport.cli.app import app

    # The profile is checked before the model is read, so a missing model is never reached.
    result = CliRunner().invoke(app, ["build", "--model", str(tmp_path / "missing.safetensors"),
                                      "--eta", str(tmp_path / "missing.npy"),
                                      "--batch-sizes", batch_sizes])
    assert result.exit_code == 2
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT and a GPU are present here")
def test_build_cli_without_gpu_completes_onnx(tmp_path, tiny_model, tiny_eta):
    out = tmp_path / "artifact"
    result = run_cli("build", "--model", str(tiny_model), "--eta", str(tiny_eta), "--out",
                     str(out), "--exporter", "torchscript", "--no-validate",
                     "--batch-sizes", "1,4,16")
    assert result.returncode == 0, result.stderr
    assert "TensorRT engine skipped: " in result.stderr
    assert "--batch-sizes 1,4,16 has no effect because no engine is built." in result.stderr
    assert (out / "model.onnx").is_file()
    assert (out / "manifest.json").is_file()
    assert not (out / ENGINE_FILENAME).exists()
    assert not (out / ENGINE_METADATA_FILENAME).exists()
