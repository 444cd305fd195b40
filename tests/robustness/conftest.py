"""Fixtures for the robustness tests: a fast artifact, copies to damage, and the real CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

CLI_TIMEOUT_S = 300


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "calibexport", *args],
        capture_output=True, text=True, cwd=cwd, timeout=CLI_TIMEOUT_S,
    )


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m calibexport ARGS`` in a subprocess and capture its text output."""
    return _run_cli


@pytest.fixture(scope="session")
def error_line() -> Callable[[str], str]:
    """Return the last non-empty line of stderr, where the CLI prints its error message."""
    return _error_line


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fast_artifact(tmp_path_factory, tiny_model, tiny_eta) -> Path:
    """An artifact of the tiny model: TorchScript export (about 1 s) and no parity run.

    The damage and determinism tests need a complete artifact whose manifest hashes verify, not
    a validated one, and the dynamo export of the shared ``tiny_artifact`` takes over 10 s.
    """
    import torch

    from calibexport.exporter.build import BuildOptions, build_artifact

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("robust-build") / "tiny"
    build_artifact(BuildOptions(model=tiny_model, eta=tiny_eta, out=out, exporter="torchscript",
                                validate=False))
    return out


@pytest.fixture
def artifact_copy(tmp_path, fast_artifact) -> Callable[[str], Path]:
    """Copy ``fast_artifact`` to ``tmp_path/NAME`` for a test that changes or replaces it."""

    def copy(name: str = "artifact") -> Path:
        target = tmp_path / name
        shutil.copytree(fast_artifact, target)
        return target

    return copy


@pytest.fixture(scope="session")
def other_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model with one weight changed: same architecture, another weights digest."""
    import torch

    from calibexport.models.loaders import load_model
    from calibexport.models.native_format import save_native

    loaded = load_model(tiny_model)
    state = {name: tensor.clone() for name, tensor in loaded.module.state_dict().items()}
    with torch.no_grad():
        state["conv_out.bias"] += 0.25
    path = tmp_path_factory.mktemp("other-model") / "other.safetensors"
    save_native(path, state, loaded.spec)
    return path
