"""Bad inputs through the real command line: exit code 2, one error line, no traceback.

Every case runs ``python -m calibexport`` in its own subprocess. The subprocesses of a group
start together (a few at a time) in one module fixture. Commands that load a model import torch,
which costs about two seconds of CPU each, so that group is marked slow. The `sample` cases
import no torch and run in the fast suite. The library-level checks of the same cases are in
test_bad_inputs.py.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PARALLEL_COMMANDS = 3
FAST_BUILD = ["--exporter", "torchscript", "--no-validate"]


def prepare_inputs(root: Path, tiny_model: Path, other_model: Path, tiny_eta: Path,
                   artifact: Path) -> dict[str, Path]:
    """Write every bad input file under ``root`` and return the paths by name."""
    import torch

    paths = {"model": tiny_model, "other_model": other_model, "eta": tiny_eta,
             "artifact": artifact, "config": tiny_model.with_suffix(".json")}

    def table(name: str, values: np.ndarray) -> None:
        paths[name] = root / f"{name}.npy"
        np.save(paths[name], values)

    table("eta_small", np.zeros((100, 1, 4, 4), np.float32))
    table("eta_rows", np.zeros((50, 1, 8, 8), np.float32))
    nan_table = np.zeros((100, 1, 8, 8), np.float32)
    nan_table[7] = np.nan
    table("eta_nan", nan_table)
    paths["eta_cut"] = root / "eta_cut.npy"
    paths["eta_cut"].write_bytes(tiny_eta.read_bytes()[:1000])

    paths["model_cut"] = root / "model_cut.safetensors"
    paths["model_cut"].write_bytes(tiny_model.read_bytes()[:5000])
    shutil.copy(paths["config"], root / "model_cut.json")
    paths["checkpoint_cut"] = root / "checkpoint_cut.pt"
    torch.save({"weights": torch.zeros(3)}, paths["checkpoint_cut"])
    paths["checkpoint_cut"].write_bytes(paths["checkpoint_cut"].read_bytes()[:200])
    paths["checkpoint_pickle"] = root / "checkpoint_pickle.pt"
    torch.save({"optimizer": Path("a path object needs unpickling")}, paths["checkpoint_pickle"])

    paths["existing_out"] = root / "existing"
    paths["existing_out"].mkdir()
    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("not a folder")

    paths["empty_folder"] = root / "empty"
    paths["empty_folder"].mkdir()
    paths["wrong_size_folder"] = root / "wrong_size"
    paths["wrong_size_folder"].mkdir()
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(paths["wrong_size_folder"] / "b.png")
    paths["rgb_array"] = root / "rgb.npy"
    np.save(paths["rgb_array"], np.zeros((4, 3, 8, 8), np.float32))

    paths["changed_artifact"] = root / "changed_artifact"
    shutil.copytree(artifact, paths["changed_artifact"])
    onnx_path = paths["changed_artifact"] / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:-10])
    paths["no_manifest"] = root / "no_manifest"
    shutil.copytree(artifact, paths["no_manifest"])
    (paths["no_manifest"] / "manifest.json").unlink()
    paths["out_dir_png"] = root / "samples.png"
    paths["out_dir_png"].mkdir()
    return paths


def build(paths: dict[str, Path], model: str, eta: str, out: Path, *extra: str) -> list[str]:
    return ["build", "--model", str(paths[model]), "--eta", str(paths[eta]), "--out", str(out),
            *FAST_BUILD, *extra]


def sample(paths: dict[str, Path], *extra: str, artifact: str = "artifact") -> list[str]:
    return ["sample", "--artifact", str(paths[artifact]), "-n", "2", "--steps", "3", "--order", "1",
            "--out", str(paths["out_dir_png"].parent / "ok.png"), *extra]


def calibrate(paths: dict[str, Path], data: Path, out: Path | None = None) -> list[str]:
    out = out or paths["a_file"].parent / "new_eta.npy"
    return ["calibrate", "--model", str(paths["model"]), "--data", str(data), "--out", str(out),
            "--num-samples", "2"]


def error_cases(paths: dict[str, Path], root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Map each case to its arguments and the fragments its one error line must contain."""
    out = root / "out"
    return {
        "eta_shape": (build(paths, "model", "eta_small", out),
                      ["H: table has 4, model needs 8", "W: table has 4, model needs 8"]),
        "eta_rows": (build(paths, "model", "eta_rows", out), ["T: table has 50, model needs 100"]),
        "eta_nan": (build(paths, "model", "eta_nan", out),
                    ["eta_nan.npy", "NaN or Inf, first in row 7"]),
        "eta_other_weights": (build(paths, "other_model", "eta", out),
                              ["was estimated for weights", "--allow-mismatch"]),
        "eta_truncated": (build(paths, "model", "eta_cut", out),
                          ["eta_cut.npy", "the file is truncated or not a .npy array"]),
        "safetensors_truncated": (build(paths, "model_cut", "eta", out),
                                  ["model_cut.safetensors", "truncated or corrupted"]),
        "checkpoint_truncated": (build(paths, "checkpoint_cut", "eta", out, "--config",
                                       str(paths["config"])),
                                 ["checkpoint_cut.pt", "truncated, corrupted"]),
        "checkpoint_unpickling": (build(paths, "checkpoint_pickle", "eta", out, "--config",
                                        str(paths["config"])),
                                  ["checkpoint_pickle.pt", "needs arbitrary unpickling"]),
        "build_existing_out": (build(paths, "model", "eta", paths["existing_out"]),
                               ["existing already exists", "pass --overwrite"]),
        "build_out_below_file": (build(paths, "model", "eta", paths["a_file"] / "out"),
                                 ["cannot create the output directory", "a_file"]),
        "data_missing": (calibrate(paths, root / "nowhere"), ["nowhere' not found"]),
        "data_empty": (calibrate(paths, paths["empty_folder"]), ["empty is empty"]),
        "data_wrong_size": (calibrate(paths, paths["wrong_size_folder"]),
                            ["b.png is 12x10 but the model needs 8x8"]),
        "data_wrong_channels": (calibrate(paths, paths["rgb_array"]),
                                ["shape [4, 3, 8, 8]", "expected [N, 1, 8, 8]"]),
        "calibrate_out_below_file": (calibrate(paths, paths["rgb_array"].with_name("unused"),
                                               out=paths["a_file"] / "eta.npy"),
                                     ["cannot write the output to", "a_file is not a writable"]),
        "steps_zero": (sample(paths, "--steps", "0"), ["steps=0 is invalid"]),
        "order_four": (sample(paths, "--order", "4"), ["order=4 is invalid", "1, 2, 3"]),
        "method_unknown": (sample(paths, "--method", "rk4"), ["unknown method 'rk4'"]),
        "t_end_above": (sample(paths, "--t-end", "1.5"), ["t_end=1.5 is outside"]),
        "t_end_zero": (sample(paths, "--t-end", "0"), ["t_end=0.0 is outside"]),
        "batch_size_zero": (sample(paths, "--batch-size", "0"), ["batch_size must be >= 1, got 0"]),
        "sample_out_is_folder": (sample(paths, "--out", str(paths["out_dir_png"])),
                                 ["failed to write", "samples.png"]),
        "artifact_changed": (sample(paths, artifact="changed_artifact"),
                             ["does not match its manifest (model.onnx: sha256"]),
        "artifact_no_manifest": (sample(paths, artifact="no_manifest"),
                                 ["manifest.json not found"]),
        "validate_changed": (["validate", "--artifact", str(paths["changed_artifact"])],
                             ["does not match its manifest (model.onnx: sha256"]),
    }


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, tiny_model, other_model, tiny_eta, fast_artifact):
    root = tmp_path_factory.mktemp("cli-inputs")
    return root, prepare_inputs(root, tiny_model, other_model, tiny_eta, fast_artifact)


SAMPLE_CASES = [
    "steps_zero", "order_four", "method_unknown", "t_end_above", "t_end_zero", "batch_size_zero",
    "sample_out_is_folder", "artifact_changed", "artifact_no_manifest",
]
TORCH_CASES = [
    "eta_shape", "eta_rows", "eta_nan", "eta_other_weights", "eta_truncated",
    "safetensors_truncated", "checkpoint_truncated", "checkpoint_unpickling",
    "build_existing_out", "build_out_below_file", "data_missing", "data_empty",
    "data_wrong_size", "data_wrong_channels", "calibrate_out_below_file", "validate_changed",
]


def run_cases(run_cli, root: Path, commands: dict[str, list[str]]) -> dict:
    with ThreadPoolExecutor(max_workers=PARALLEL_COMMANDS) as pool:
        futures = {name: pool.submit(run_cli, *args, cwd=root) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def sample_results(cli_inputs, run_cli):
    """Run the `sample` error cases; return the results by case name."""
    root, paths = cli_inputs
    cases = error_cases(paths, root)
    return run_cases(run_cli, root, {name: cases[name][0] for name in SAMPLE_CASES})


@pytest.fixture(scope="module")
def torch_results(cli_inputs, run_cli):
    """Run the build, calibrate and validate cases and an allowed mismatch build."""
    root, paths = cli_inputs
    cases = error_cases(paths, root)
    commands = {name: cases[name][0] for name in TORCH_CASES}
    commands["allow_mismatch"] = build(paths, "other_model", "eta", root / "mismatch_out",
                                       "--allow-mismatch")
    return run_cases(run_cli, root, commands)


def test_case_lists_are_complete(cli_inputs):
    root, paths = cli_inputs
    assert sorted(SAMPLE_CASES + TORCH_CASES) == sorted(error_cases(paths, root))


@pytest.mark.parametrize(
    "case",
    SAMPLE_CASES + [pytest.param(name, marks=pytest.mark.slow) for name in TORCH_CASES],
)
def test_cli_error_exits_2_with_one_line(request, cli_inputs, error_line, case):
    root, paths = cli_inputs
    expected = error_cases(paths, root)[case][1]
    group = "sample_results" if case in SAMPLE_CASES else "torch_results"
    result = request.getfixturevalue(group)[case]
    line = error_line(result.stderr)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert line.startswith("error: "), result.stderr
    for fragment in expected:
        assert fragment in line, f"{fragment!r} not in {line!r}"


@pytest.mark.slow
def test_cli_writes_nothing_on_error(cli_inputs, sample_results, torch_results):
    root, paths = cli_inputs
    assert not (root / "out").exists()
    assert not (root / "new_eta.npy").exists()
    assert not (root / "ok.png").exists()
    assert list(paths["existing_out"].iterdir()) == []
    assert [p.name for p in root.iterdir() if ".tmp" in p.name] == []


@pytest.mark.slow
def test_cli_allow_mismatch_builds(cli_inputs, torch_results):
    root, _ = cli_inputs
    result = torch_results["allow_mismatch"]
    assert result.returncode == 0, result.stderr
    assert "continuing because --allow-mismatch is set" in result.stderr
    assert (root / "mismatch_out" / "manifest.json").is_file()
