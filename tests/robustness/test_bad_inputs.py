"""Bad inputs at the library level: each raises CalibexportError naming the value and the fix.

The same cases through the real command line live in test_cli_errors.py.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from calibexport.calibration_tables.data import load_data
from calibexport.calibration_tables.table_io import save_eta_table
from calibexport.errors import CalibexportError
from calibexport.exporter.atomic import atomic_directory, atomic_write_bytes
from calibexport.exporter.build import BuildOptions, build_artifact, check_eta_matches_model
from calibexport.exporter.fold import fold_eta
from calibexport.models.loaders import load_model
from calibexport.runtime.artifact import load_manifest, verify_artifact_files
from calibexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from calibexport.runtime.eta_table import load_eta_table
from calibexport.runtime.sampler import Sampler
from calibexport.runtime.schedule import DiscreteVPSchedule, LinearVPSchedule
from calibexport.runtime.solvers import solve

IMAGE_SHAPE = (1, 8, 8)
NUM_TIMESTEPS = 100


@pytest.fixture(scope="module")
def loaded_tiny(tiny_model):
    return load_model(tiny_model)


def save_bare_table(path: Path, values: np.ndarray) -> Path:
    """Write a table without a sidecar, bypassing the checks of save_eta_table."""
    np.save(path, values)
    return path


def cut_file(source: Path, target: Path, keep: int) -> Path:
    target.write_bytes(source.read_bytes()[:keep])
    return target


# eta table against the model -------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, message",
    [
        ((50, 1, 8, 8), "T: table has 50, model needs 100"),
        ((100, 3, 8, 8), "C: table has 3, model needs 1"),
        ((100, 1, 4, 8), "H: table has 4, model needs 8"),
        ((100, 1, 8, 16), "W: table has 16, model needs 8"),
    ],
)
def test_eta_shape_mismatch_names_dimension(tmp_path, loaded_tiny, shape, message):
    table = load_eta_table(save_bare_table(tmp_path / "eta.npy", np.zeros(shape, np.float32)))
    with pytest.raises(CalibexportError, match=re.escape(message)) as caught:
        check_eta_matches_model(table, loaded_tiny, allow_mismatch=False)
    assert "estimate a new table" in str(caught.value)


@pytest.mark.parametrize(
    "schedule, rows",
    [
        ({"kind": "discrete", "betas": np.linspace(1e-3, 0.2, 100).tolist()}, 100),
        ({"kind": "linear", "beta_0": 0.1, "beta_1": 20.0}, 1000),
    ],
)
def test_eta_row_count_without_num_timesteps(tmp_path, loaded_tiny, schedule, rows):
    # Neither spec states num_timesteps; the expected row count comes from the schedule itself.
    spec = dataclasses.replace(loaded_tiny.spec, schedule=schedule)
    loaded = dataclasses.replace(loaded_tiny, spec=spec)
    table = load_eta_table(save_bare_table(tmp_path / "eta.npy", np.zeros((50, *IMAGE_SHAPE),
                                                                            np.float32)))
    with pytest.raises(CalibexportError, match=f"T: table has 50, model needs {rows}"):
        check_eta_matches_model(table, loaded, allow_mismatch=False)


def test_build_with_wrong_shape_writes_nothing(tmp_path, tiny_model):
    eta = save_bare_table(tmp_path / "eta.npy", np.zeros((100, 1, 4, 4), np.float32))
    out = tmp_path / "out"
    with pytest.raises(CalibexportError, match="H: table has 4, model needs 8"):
        build_artifact(BuildOptions(model=tiny_model, eta=eta, out=out, validate=False))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_eta_non_finite_rejected_everywhere(tmp_path, bad):
    values = np.zeros((NUM_TIMESTEPS, *IMAGE_SHAPE), np.float32)
    values[7, 0, 3, 3] = bad
    path = save_bare_table(tmp_path / "eta.npy", values)

    with pytest.raises(CalibexportError, match=r"contains NaN or Inf, first in row 7 \(1 of 100"):
        load_eta_table(path)
    with pytest.raises(CalibexportError, match=r"row 7 contains NaN or Inf"):
        save_eta_table(tmp_path / "saved" / "eta.npy", values, None)
    assert not (tmp_path / "saved" / "eta.npy").exists()
    network = identity_network("t", TensorProto.FLOAT, IMAGE_SHAPE)
    with pytest.raises(CalibexportError, match=r"NaN or Inf in rows \[7\]"):
        fold_eta(network, values)


def test_eta_for_other_weights_rejected(loaded_tiny, other_model, tiny_eta):
    other = load_model(other_model)
    table = load_eta_table(tiny_eta)
    recorded = table.metadata["model_weights_sha256"]
    assert recorded == loaded_tiny.weights_sha256
    assert other.weights_sha256 != recorded

    with pytest.raises(CalibexportError, match=re.escape(recorded[:12])) as caught:
        check_eta_matches_model(table, other, allow_mismatch=False)
    assert other.weights_sha256[:12] in str(caught.value)
    assert "--allow-mismatch" in str(caught.value)
    assert "calibexport calibrate" in str(caught.value)


def test_allow_mismatch_builds_with_warning(tmp_path, other_model, tiny_eta, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="calibexport.exporter.build"):
        result = build_artifact(BuildOptions(model=other_model, eta=tiny_eta, out=out,
                                             exporter="torchscript", validate=False,
                                             allow_mismatch=True))
    assert result.out == out
    verify_artifact_files(out, load_manifest(out))
    assert "continuing because --allow-mismatch is set" in caplog.text


# Truncated and corrupted files ------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 5, 60, 128, 2000, -1])
def test_truncated_npy_rejected(tmp_path, keep):
    ones = np.ones((NUM_TIMESTEPS, *IMAGE_SHAPE), np.float32)
    full = save_bare_table(tmp_path / "full.npy", ones)
    size = full.stat().st_size
    cut = cut_file(full, tmp_path / "eta.npy", keep % size if keep >= 0 else size - 1)
    with pytest.raises(CalibexportError, match=r"cannot read eta table .*eta\.npy: the file is "
                                               r"truncated or not a \.npy array"):
        load_eta_table(cut)


def test_npy_with_damaged_header_rejected(tmp_path):
    ones = np.ones((NUM_TIMESTEPS, *IMAGE_SHAPE), np.float32)
    full = save_bare_table(tmp_path / "full.npy", ones)
    data = bytearray(full.read_bytes())
    data[20:40] = b"\xff" * 20
    damaged = tmp_path / "eta.npy"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CalibexportError, match="truncated or not a .npy array"):
        load_eta_table(damaged)


def test_table_changed_after_sidecar_rejected(tmp_path, tiny_eta):
    # One changed value with the original sidecar: the recorded eta_sha256 no longer matches.
    values = np.load(tiny_eta)
    values[3, 0, 0, 0] += 1.0
    np.save(tmp_path / "eta.npy", values)
    (tmp_path / "eta.json").write_text(tiny_eta.with_suffix(".json").read_text())
    with pytest.raises(CalibexportError, match="does not match its sidecar: sha256"):
        load_eta_table(tmp_path / "eta.npy")


@pytest.mark.parametrize("keep", [0, 4, 8, 50, "half", "all-but-10"])
def test_truncated_safetensors_rejected(tmp_path, tiny_model, keep):
    size = tiny_model.stat().st_size
    keep = {"half": size // 2, "all-but-10": size - 10}.get(keep, keep)
    cut = cut_file(tiny_model, tmp_path / "model.safetensors", keep)
    (tmp_path / "model.json").write_text(tiny_model.with_suffix(".json").read_text())
    with pytest.raises(CalibexportError, match=r"could not read safetensors checkpoint .*model"
                                               r"\.safetensors: .*truncated or corrupted"):
        load_model(cut)


def test_safetensors_with_damaged_header_rejected(tmp_path, tiny_model):
    data = bytearray(tiny_model.read_bytes())
    data[10:20] = b"\xff" * 10
    damaged = tmp_path / "model.safetensors"
    damaged.write_bytes(bytes(data))
    (tmp_path / "model.json").write_text(tiny_model.with_suffix(".json").read_text())
    with pytest.raises(CalibexportError, match="could not read safetensors checkpoint"):
        load_model(damaged)


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory, loaded_tiny) -> Path:
    import torch

    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    torch.save(loaded_tiny.module.state_dict(), path)
    return path


@pytest.mark.parametrize("keep", [0, 10, 100, "half", "all-but-5"])
def test_truncated_torch_checkpoint_rejected(tmp_path, tiny_model, torch_checkpoint, keep):
    size = torch_checkpoint.stat().st_size
    keep = {"half": size // 2, "all-but-5": size - 5}.get(keep, keep)
    cut = cut_file(torch_checkpoint, tmp_path / "model.pt", keep)
    with pytest.raises(CalibexportError, match=r"could not read checkpoint .*model\.pt: .*"
                                               r"truncated, corrupted or not a torch checkpoint"):
        load_model(cut, config=str(tiny_model.with_suffix(".json")))


def test_torch_checkpoint_with_damaged_tensor_rejected(tmp_path, tiny_model, torch_checkpoint):
    # torch.load itself accepts this file: only the zip CRC-32 reveals the changed tensor bytes.
    data = bytearray(torch_checkpoint.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 100] = bytes(100)
    damaged = tmp_path / "model.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CalibexportError, match=r"model\.pt is corrupted: the CRC-32 of its member "
                                               r"'model/data/\d+' does not match"):
        load_model(damaged, config=str(tiny_model.with_suffix(".json")))


def test_checkpoint_needing_unpickling_rejected(tmp_path, tiny_model, loaded_tiny):
    import torch

    path = tmp_path / "model.pt"
    torch.save({"state_dict": loaded_tiny.module.state_dict(), "note": Note("trained")}, path)
    with pytest.raises(CalibexportError, match=r"needs arbitrary unpickling to load \(it "
                                               r"references .*Note\)") as caught:
        load_model(path, config=str(tiny_model.with_suffix(".json")))
    assert "safetensors" in str(caught.value)


class Note:
    """A harmless custom class: saving it makes torch pickle a reference to this module."""

    def __init__(self, text: str) -> None:
        self.text = text


@pytest.mark.parametrize("keep", [0, 10, "half", "all-but-3"])
def test_truncated_onnx_rejected(tmp_path, fast_artifact, keep):
    source = fast_artifact / "model.onnx"
    size = source.stat().st_size
    keep = {"half": size // 2, "all-but-3": size - 3}.get(keep, keep)
    cut = cut_file(source, tmp_path / "model.onnx", keep)
    with pytest.raises(CalibexportError, match=r"ONNX Runtime could not load .*model\.onnx"):
        OnnxRuntimeBackend(cut)


def test_garbage_onnx_rejected(tmp_path):
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CalibexportError, match=r"ONNX Runtime could not load .*model\.onnx"):
        OnnxRuntimeBackend(garbage)


# Artifacts that do not match their manifest ---------------------------------------------------


@pytest.mark.parametrize("name", ["model.onnx", "eta.npy", "eta.json"])
def test_changed_artifact_file_rejected(artifact_copy, name):
    artifact = artifact_copy()
    target = artifact / name
    data = bytearray(target.read_bytes())
    data[-2] ^= 0x01
    target.write_bytes(bytes(data))

    with pytest.raises(CalibexportError, match=rf"does not match its manifest \({re.escape(name)}:"
                                               r" sha256 \w+\.\.\., manifest has \w+\.\.\.\)"):
        verify_artifact_files(artifact, load_manifest(artifact))
    with pytest.raises(CalibexportError, match="Rebuild the artifact"):
        Sampler.from_artifact(artifact)


def test_missing_artifact_file_rejected(artifact_copy):
    artifact = artifact_copy()
    (artifact / "eta.npy").unlink()
    with pytest.raises(CalibexportError, match=r"eta\.npy: missing"):
        Sampler.from_artifact(artifact)


def test_missing_manifest_rejected(artifact_copy):
    artifact = artifact_copy()
    (artifact / "manifest.json").unlink()
    with pytest.raises(CalibexportError, match=r"manifest\.json not found: .* is not a calibexport "
                                               r"artifact"):
        Sampler.from_artifact(artifact)


# Data sources for calibration -----------------------------------------------------------------


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_missing_data_folder_rejected(tmp_path):
    with pytest.raises(CalibexportError, match=r"data source '.*nowhere' not found"):
        load_data(tmp_path / "nowhere", channels=1, resolution=8)


def test_empty_data_folder_rejected(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(CalibexportError, match=r"data folder .*images is empty"):
        load_data(tmp_path / "images", channels=1, resolution=8)


def test_folder_without_images_rejected(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "readme.txt").write_text("no pictures")
    with pytest.raises(CalibexportError, match=r"contains no images .* such as 'readme\.txt'"):
        load_data(tmp_path / "images", channels=1, resolution=8)


def test_image_of_wrong_size_rejected(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    save_png(tmp_path / "b.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(CalibexportError, match=r"image .*b\.png is 12x10 but the model needs 8x8"):
        load_data(tmp_path, channels=1, resolution=8)


def test_unreadable_image_rejected(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(CalibexportError, match=r"cannot read image .*broken\.png"):
        load_data(tmp_path, channels=1, resolution=8)


@pytest.mark.parametrize(
    "shape, channels",
    [((4, 3, 8, 8), 1), ((4, 8, 8, 3), 1), ((4, 1, 8, 8), 3), ((4, 2, 8, 8), 3)],
)
def test_array_of_wrong_channel_count_rejected(tmp_path, shape, channels):
    path = tmp_path / "images.npy"
    np.save(path, np.zeros(shape, np.float32))
    expected = f"expected [N, {channels}, 8, 8] or [N, 8, 8, {channels}]"
    with pytest.raises(CalibexportError, match=re.escape(expected)):
        load_data(path, channels=channels, resolution=8)


def test_folder_for_four_channels_rejected(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(CalibexportError, match="the model needs 4; pass the data as a .npy array"):
        load_data(tmp_path, channels=4, resolution=8)


@pytest.mark.parametrize("pixels, channels, mode", [((8, 8, 3), 1, "RGB"), ((8, 8), 3, "L")])
def test_folder_channel_conversion_is_logged(tmp_path, caplog, pixels, channels, mode):
    save_png(tmp_path / "a.png", np.full(pixels, 128, np.uint8))
    with caplog.at_level(logging.WARNING, logger="calibexport.calibration_tables.data"):
        images = load_data(tmp_path, channels=channels, resolution=8)
    assert images.shape == (1, channels, 8, 8)
    assert f"Converted images of mode {mode}" in caplog.text
    assert f"for the {channels}-channel model" in caplog.text


# Sampling options ------------------------------------------------------------------------------


def zero_eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.zeros_like(x)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"steps": 0}, "steps=0 is invalid"),
        ({"steps": -3}, "steps=-3 is invalid"),
        ({"steps": 2.5}, "steps=2.5 is invalid"),
        ({"order": 0}, "order=0 is invalid; valid orders: 1, 2, 3"),
        ({"order": 4}, "order=4 is invalid; valid orders: 1, 2, 3"),
        ({"method": "rk4"}, "unknown method 'rk4'; valid methods: singlestep"),
        ({"spacing": "cosine"}, "unknown spacing 'cosine'; valid spacings: logSNR"),
        ({"method": "ddim", "order": 2}, "method 'ddim' is first order"),
    ],
)
def test_solver_options_rejected(options, message):
    schedule = DiscreteVPSchedule.linear(num_timesteps=NUM_TIMESTEPS)
    x_T = np.zeros((2, *IMAGE_SHAPE), np.float32)
    arguments = {"steps": 5, "order": 2, "method": "singlestep", **options}
    with pytest.raises(CalibexportError, match=re.escape(message)):
        solve(zero_eps, x_T, schedule, **arguments)


@pytest.mark.parametrize("t_end", [0.0, -0.1, 1.0, 1.5, float("nan")])
@pytest.mark.parametrize("schedule", [DiscreteVPSchedule.linear(num_timesteps=100),
                                      LinearVPSchedule()], ids=["discrete", "linear"])
def test_t_end_outside_schedule_rejected(schedule, t_end):
    x_T = np.zeros((1, *IMAGE_SHAPE), np.float32)
    with pytest.raises(CalibexportError, match=rf"t_end={t_end} is outside the schedule's time "
                                               r"range \(0, 1\.0\); use a value such as"):
        solve(zero_eps, x_T, schedule, steps=5, order=2, t_end=t_end)


def test_t_end_where_lambda_is_undefined_rejected():
    # Extrapolating the discrete schedule below t = 1/N reaches log_alpha >= 0 near t = 0.
    schedule = DiscreteVPSchedule.linear(beta_start=0.2, beta_end=0.3, num_timesteps=10)
    x_T = np.zeros((1, *IMAGE_SHAPE), np.float32)
    with pytest.raises(CalibexportError, match=r"t_end=1e-06 gives log_alpha=.* lambda is "
                                               r"undefined there; use a larger t_end"):
        solve(zero_eps, x_T, schedule, steps=5, order=2, t_end=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_samples": 0}, "num_samples must be >= 1, got 0"),
        ({"num_samples": 2, "batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"num_samples": 2, "seed": -1}, "seed=-1 is invalid"),
        ({"num_samples": 2, "t_end": 2.0}, "t_end=2.0 is outside the schedule's time range"),
    ],
)
def test_sampler_options_rejected(fast_artifact, options, message):
    with Sampler.from_artifact(fast_artifact) as sampler:
        with pytest.raises(CalibexportError, match=re.escape(message)):
            sampler.sample(steps=3, order=1, **options)


# Timesteps outside the table at the ONNX level --------------------------------------------------


def identity_network(timestep: str, timestep_type: int,
                     image_shape: tuple[int, int, int]) -> onnx.ModelProto:
    """Build eps = x with an unused timestep input [B], so the folded output is x - eta(t)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["eps"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *image_shape]),
         helper.make_tensor_value_info(timestep, timestep_type, ["batch"])],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", *image_shape])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_folded(model: onnx.ModelProto, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "t": t})[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_folded_times_outside_table_clamped(dtype):
    # Every row is nonzero, so a silent zero from an out-of-range lookup would show.
    eta = np.arange(1, 5 * 4 + 1, dtype=np.float32).reshape(5, 1, 2, 2)
    onnx_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    folded = fold_eta(identity_network("t", onnx_type, (1, 2, 2)), eta)
    t = np.array([-1000, -1, 5, 4000], dtype=dtype)
    x = np.zeros((4, 1, 2, 2), np.float32)

    eta_seen = -run_folded(folded, x, t)
    np.testing.assert_array_equal(eta_seen[0], eta[0])
    np.testing.assert_array_equal(eta_seen[1], eta[0])
    np.testing.assert_array_equal(eta_seen[2], eta[4])
    np.testing.assert_array_equal(eta_seen[3], eta[4])


def test_folded_infinite_times_clamped_nan_propagates():
    eta = np.arange(1, 5 * 4 + 1, dtype=np.float32).reshape(5, 1, 2, 2)
    folded = fold_eta(identity_network("t", TensorProto.FLOAT, (1, 2, 2)), eta)
    t = np.array([np.inf, -np.inf, np.nan, 2.0], dtype=np.float32)
    eta_seen = -run_folded(folded, np.zeros((4, 1, 2, 2), np.float32), t)

    np.testing.assert_array_equal(eta_seen[0], eta[4])
    np.testing.assert_array_equal(eta_seen[1], eta[0])
    assert np.all(np.isnan(eta_seen[2])), "a NaN time must give NaN, not a table row or zero"
    np.testing.assert_array_equal(eta_seen[3], eta[2])


def test_artifact_times_outside_table_clamped(fast_artifact, loaded_tiny):
    import torch

    x = np.random.default_rng(0).standard_normal((4, *IMAGE_SHAPE)).astype(np.float32)
    timestep = np.array([-50.0, -0.5, 99.5, 1e5])
    with OnnxRuntimeBackend(fast_artifact / "model.onnx") as backend:
        deployed = backend.eps(x, timestep)
    # The network itself sees the raw time; only the eta lookup is clamped to rows 0 and 99.
    with torch.no_grad():
        network = loaded_tiny.module(torch.from_numpy(x),
                                     torch.from_numpy(timestep.astype(np.float32))).numpy()
    eta = load_eta_table(fast_artifact / "eta.npy").values
    expected_eta = eta[[0, 0, 99, 99]]
    assert np.all(np.abs(expected_eta).max(axis=(1, 2, 3)) > 1e-3), "the rows must be nonzero"

    np.testing.assert_allclose(network - deployed, expected_eta, atol=2e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_backend_rejects_non_finite_timestep(fast_artifact, bad):
    x = np.zeros((2, *IMAGE_SHAPE), np.float32)
    with OnnxRuntimeBackend(fast_artifact / "model.onnx") as backend:
        with pytest.raises(CalibexportError, match=r"onnxruntime: timestep contains non-finite "
                                                   r"values \[.*\]; pass finite model input times"):
            backend.eps(x, np.array([10.0, bad]))


# Output paths --------------------------------------------------------------------------------


def test_build_into_existing_directory_needs_overwrite(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(CalibexportError, match=r"output directory .*artifact already exists; pass "
                                               r"--overwrite to replace it"):
        with atomic_directory(out, overwrite=False):
            pass
    assert (out / "keep.txt").read_text() == "old"


def test_output_below_a_file_rejected(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CalibexportError, match=r"cannot create the output directory .*file/out: "
                                               r".*choose another --out"):
        with atomic_directory(tmp_path / "file" / "out", overwrite=False):
            pass
    (tmp_path / "samples.png").mkdir()
    with pytest.raises(CalibexportError, match=r"failed to write .*samples\.png: .*choose another "
                                               r"output path"):
        atomic_write_bytes(tmp_path / "samples.png", b"png")
