"""``calibexport fold`` on real ONNX exports, in a subprocess where torch cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from typer.testing import CliRunner
from click.testing import Result

from calibexport.cli.app import app
from calibexport.runtime.eta_table import EtaTable
from calibexport.runtime.prediction import alpha_sigma_at_timesteps, to_eps
from calibexport.runtime.schedule import schedule_from_spec

IMAGE_SHAPE = (1, 8, 8)
NUM_ROWS = 50
SCHEDULE = {"kind": "discrete", "beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.2,
            "num_timesteps": NUM_ROWS}

RUN_WITHOUT_TORCH = """
import importlib.abc, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None

sys.meta_path.insert(0, BlockTorch())
from calibexport.cli.app import main

sys.argv = ["calibexport", *sys.argv[1:]]
main()
"""


def run_fold_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, "fold", *args],
                          capture_output=True, text=True, timeout=300)


def run_fold(*args: str) -> Result:
    """Run the command in this process; the torch-free run is the test above the others."""
    import calibexport.cli.fold  # noqa: F401  (registers the command)

    return CliRunner().invoke(app, ["fold", *args])


def run_fold_quick(*args: str) -> Result:
    """Run the command without the graph optimization pass, which takes about a second."""
    return run_fold(*args, "--no-optimize")


def export_network(path: Path, timestep_dtype: str) -> Path:
    """Export a random tiny UNet whose inputs are named ``sample`` and ``timestep``."""
    import torch

    from calibexport.exporter.onnx_export import export_onnx
    from calibexport.models.unet import DDPMUNet, UNetConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                        num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    export_onnx(DDPMUNet(config).eval(), path, image_shape=IMAGE_SHAPE,
                timestep_dtype=timestep_dtype, exporter="torchscript")
    model = onnx.load(str(path))
    renames = {"x": "sample", "t": "timestep"}
    for value in model.graph.input:
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def networks(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("networks")
    return {dtype: export_network(folder / f"unet_{dtype}.onnx", dtype)
            for dtype in ("int32", "int64", "float32", "float64")}


@pytest.fixture(scope="module")
def eta_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eta")
    values = np.random.default_rng(3).normal(size=(NUM_ROWS, *IMAGE_SHAPE)).astype(np.float32)
    bare = folder / "bare" / "eta.npy"
    bare.parent.mkdir()
    np.save(bare, values)
    with_sidecar = folder / "sidecar" / "eta.npy"
    with_sidecar.parent.mkdir()
    np.save(with_sidecar, values)
    with_sidecar.with_suffix(".json").write_text(json.dumps({"schedule": SCHEDULE}))
    return {"bare": bare, "sidecar": with_sidecar}


def evaluate(path: Path, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Run the model with ONNX Runtime's graph rewrites off, so results compare bit for bit."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"sample": x, "timestep": t})[0]


def images(batch: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(batch, *IMAGE_SHAPE)).astype(np.float32)


def test_fold_runs_without_torch(tmp_path, networks, eta_files):
    out = tmp_path / "model.onnx"
    result = run_fold_without_torch("--onnx", str(networks["int64"]), "--eta",
                                    str(eta_files["bare"]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    t = np.array([5, 30], dtype=np.int64)
    x = images(2)
    expected = evaluate(networks["int64"], x, t) - np.load(eta_files["bare"])[t]
    np.testing.assert_array_equal(evaluate(out, x, t), expected)


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_fold_integer_timestep_exact(tmp_path, networks, eta_files, dtype):
    out = tmp_path / "model.onnx"
    result = run_fold("--onnx", str(networks[dtype]), "--eta", str(eta_files["bare"]),
                      "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "timestep input 'timestep'" in result.stdout
    t = np.array([0, 17, 49, 80], dtype=dtype)
    x = images(len(t))
    eta = np.load(eta_files["bare"])
    expected = evaluate(networks[dtype], x, t) - eta[np.clip(t, 0, NUM_ROWS - 1)]
    np.testing.assert_array_equal(evaluate(out, x, t), expected)
    assert onnx.load(str(out)).graph.input[1].type.tensor_type.elem_type == (
        onnx.load(str(networks[dtype])).graph.input[1].type.tensor_type.elem_type)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fold_float_timestep_interpolates(tmp_path, networks, eta_files, dtype):
    out = tmp_path / "model.onnx"
    result = run_fold_quick("--onnx", str(networks[dtype]), "--eta", str(eta_files["bare"]),
                      "--out", str(out))
    assert result.exit_code == 0, result.output
    t = np.array([0.0, 12.25, 48.5, 49.0], dtype=dtype)
    x = images(len(t))
    table = EtaTable(np.load(eta_files["bare"]))
    expected = evaluate(networks[dtype], x, t) - table.at(t)
    np.testing.assert_allclose(evaluate(out, x, t), expected, atol=1e-6)


def test_fold_x0_with_schedule_from_sidecar(tmp_path, networks, eta_files):
    out = tmp_path / "model.onnx"
    result = run_fold_quick("--onnx", str(networks["float32"]), "--eta", str(eta_files["sidecar"]),
                      "--out", str(out), "--prediction-type", "x0")
    assert result.exit_code == 0, result.output
    t = np.array([0.0, 10.5, 49.0], dtype=np.float32)
    x = images(len(t))
    alpha, sigma = alpha_sigma_at_timesteps(schedule_from_spec(SCHEDULE), t)
    alpha, sigma = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
    implied = to_eps("x0", evaluate(out, x, t).astype(np.float64), x, alpha, sigma)
    source = to_eps("x0", evaluate(networks["float32"], x, t).astype(np.float64), x, alpha, sigma)
    table = EtaTable(np.load(eta_files["sidecar"]))
    np.testing.assert_allclose(implied, source - table.at(t), atol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["calibexport.prediction_type"] == "x0"
    assert json.loads(props["calibexport.schedule"]) == SCHEDULE


def test_fold_v_without_schedule_rejected(tmp_path, networks, eta_files):
    result = run_fold_quick("--onnx", str(networks["float32"]), "--eta", str(eta_files["bare"]),
                      "--out", str(tmp_path / "model.onnx"), "--prediction-type", "v")
    assert result.exit_code == 2
    assert "needs its noise schedule" in result.stderr
    assert not (tmp_path / "model.onnx").exists()


def test_fold_v_with_schedule_file(tmp_path, networks, eta_files):
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps(SCHEDULE))
    out = tmp_path / "model.onnx"
    result = run_fold_quick("--onnx", str(networks["int64"]), "--eta", str(eta_files["bare"]),
                      "--out", str(out), "--prediction-type", "v", "--schedule", str(schedule))
    assert result.exit_code == 0, result.output
    t = np.array([3, 40], dtype=np.int64)
    x = images(2)
    alpha, _ = schedule_from_spec(SCHEDULE).alpha_sigma_at_timesteps()
    eta = np.load(eta_files["bare"])
    expected = evaluate(networks["int64"], x, t) - eta[t] / alpha[t].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(evaluate(out, x, t), expected, rtol=1e-5, atol=1e-5)


def test_fold_rows_must_match_schedule(tmp_path, networks, eta_files):
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps({**SCHEDULE, "num_timesteps": 1000}))
    result = run_fold_quick("--onnx", str(networks["float32"]), "--eta", str(eta_files["bare"]),
                      "--out", str(tmp_path / "model.onnx"), "--schedule", str(schedule))
    assert result.exit_code == 2
    assert "has 50 rows but the schedule" in result.stderr


def test_fold_existing_output_kept_without_overwrite(tmp_path, networks, eta_files):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    result = run_fold_quick("--onnx", str(networks["float32"]), "--eta", str(eta_files["bare"]),
                      "--out", str(out))
    assert result.exit_code == 2
    assert "already exists; pass --overwrite" in result.stderr
    assert out.read_bytes() == b"previous"


def test_fold_unknown_timestep_name(tmp_path, networks, eta_files):
    result = run_fold_quick("--onnx", str(networks["float32"]), "--eta", str(eta_files["bare"]),
                      "--out", str(tmp_path / "model.onnx"), "--timestep-input", "t")
    assert result.exit_code == 2
    assert "timestep input 't' not found" in result.stderr
    assert "timestep (float" in result.stderr
