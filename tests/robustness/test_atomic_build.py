"""Failed and interrupted writes leave the previous artifact or table intact and nothing partial."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from calibexport.calibration_tables import table_io
from calibexport.errors import CalibexportError
from calibexport.exporter import build as build_module
from calibexport.exporter.build import BuildOptions, ParityFailed, build_artifact
from calibexport.runtime.artifact import load_manifest, verify_artifact_files
from calibexport.runtime.eta_table import load_eta_table

SIGNAL_WAIT_S = 240


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def hidden_entries(parent: Path) -> list[str]:
    """Return the temporary siblings (``.NAME.tmp-*``, ``.NAME.old-*``) left in ``parent``."""
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


def assert_intact(artifact: Path, before: dict[str, bytes]) -> None:
    assert snapshot(artifact) == before
    verify_artifact_files(artifact, load_manifest(artifact))
    assert hidden_entries(artifact.parent) == []


def fail_after_partial_write(path_of, error: BaseException):
    """Return a replacement writer that writes half a file at ``path_of(args)`` and raises."""

    def writer(*args, **kwargs):
        target = Path(path_of(args))
        target.write_bytes(b"partial")
        raise error

    return writer


WRITERS = {
    "save_onnx": lambda args: args[1],
    "write_manifest": lambda args: Path(args[0]) / "manifest.json",
    "_copy_table": lambda args: Path(args[1]) / "eta.npy",
}


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupt"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_failed_write_keeps_previous_artifact(monkeypatch, artifact_copy, tiny_model, tiny_eta,
                                              writer, error):
    artifact = artifact_copy()
    before = snapshot(artifact)
    monkeypatch.setattr(build_module, writer, fail_after_partial_write(WRITERS[writer], error))

    options = BuildOptions(model=tiny_model, eta=tiny_eta, out=artifact, overwrite=True,
                           exporter="torchscript", validate=False)
    with pytest.raises(type(error)):
        build_artifact(options)
    assert_intact(artifact, before)


@pytest.mark.parametrize("failing_rename", [1, 2])
def test_interrupted_install_restores_previous(monkeypatch, tmp_path, failing_rename):
    # Installing renames the old directory aside (1), then the new one into place (2).
    from calibexport.exporter import atomic

    final = tmp_path / "artifact"
    final.mkdir()
    (final / "model.onnx").write_bytes(b"old")
    real_replace = atomic.os.replace
    calls = []

    def replace(source, target):
        calls.append(target)
        if len(calls) == failing_rename:
            raise KeyboardInterrupt
        real_replace(source, target)

    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_directory(final, overwrite=True) as tmp:
            (tmp / "model.onnx").write_bytes(b"new")
            monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.undo()

    assert (final / "model.onnx").read_bytes() == b"old"
    assert hidden_entries(tmp_path) == []


def test_failed_first_build_leaves_nothing(monkeypatch, tmp_path, tiny_model, tiny_eta):
    monkeypatch.setattr(build_module, "write_manifest",
                        fail_after_partial_write(WRITERS["write_manifest"], OSError("I/O error")))
    out = tmp_path / "artifact"
    with pytest.raises(OSError, match="I/O error"):
        build_artifact(BuildOptions(model=tiny_model, eta=tiny_eta, out=out,
                                    exporter="torchscript", validate=False))
    assert not out.exists()
    assert hidden_entries(tmp_path) == []


def test_parity_failure_keeps_previous_artifact(monkeypatch, artifact_copy, tiny_model, tiny_eta):
    import calibexport.validate.run as validate_run

    artifact = artifact_copy()
    before = snapshot(artifact)

    def failing_validation(directory, **kwargs):
        return {"status": "FAILED", "checks": [{"name": "single_eval", "passed": False}]}

    monkeypatch.setattr(validate_run, "validate_directory", failing_validation)
    options = BuildOptions(model=tiny_model, eta=tiny_eta, out=artifact, overwrite=True,
                           exporter="torchscript")
    with pytest.raises(ParityFailed, match=r"parity failed \(single_eval\); the build was not "
                                           r"installed") as caught:
        build_artifact(options)
    assert_intact(artifact, before)
    assert caught.value.rejected == artifact.with_name("artifact.rejected")
    assert (caught.value.rejected / "model.onnx").is_file()


def test_build_over_existing_needs_overwrite(artifact_copy, tiny_model, tiny_eta):
    artifact = artifact_copy()
    before = snapshot(artifact)
    options = BuildOptions(model=tiny_model, eta=tiny_eta, out=artifact, exporter="torchscript",
                           validate=False)
    with pytest.raises(CalibexportError, match=r"artifact already exists; pass --overwrite to "
                                               r"replace it or choose another --out"):
        build_artifact(options)
    assert_intact(artifact, before)


def start_build(model: Path, eta: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "calibexport", "build", "--model", str(model), "--eta",
               str(eta), "--out", str(out), "--overwrite"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(process: subprocess.Popen, ready) -> Path:
    """Poll until ``ready()`` returns a path; fail if the process ends first."""
    deadline = time.monotonic() + SIGNAL_WAIT_S
    while time.monotonic() < deadline:
        found = ready()
        if found is not None:
            return found
        if process.poll() is not None:
            pytest.fail(f"build ended (code {process.returncode}) before the signal: "
                        f"{process.stderr.read()}")
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"build did not reach the expected phase within {SIGNAL_WAIT_S} s")


def temporary_dir(parent: Path, name: str, inner: str | None = None):
    def ready() -> Path | None:
        for candidate in parent.glob(f".{name}.tmp-*"):
            if inner is None or (candidate / inner).is_file():
                return candidate
        return None

    return ready


@pytest.mark.parametrize(
    "phase",
    ["export", pytest.param("validation", marks=pytest.mark.slow)],
)
def test_sigint_during_build_keeps_previous_artifact(artifact_copy, tiny_model, tiny_eta, phase):
    artifact = artifact_copy()
    before = snapshot(artifact)
    process = start_build(tiny_model, tiny_eta, artifact)
    try:
        # The temporary directory appears before the export; manifest.json before validation.
        inner = "manifest.json" if phase == "validation" else None
        temporary = wait_for(process, temporary_dir(artifact.parent, artifact.name, inner))
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=SIGNAL_WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 130, stderr
    assert "interrupted: nothing was installed at the output path" in stderr
    assert "Traceback" not in stderr
    assert not temporary.exists()
    assert_intact(artifact, before)


# eta tables -------------------------------------------------------------------------------------


def test_failed_sidecar_write_keeps_previous_table(monkeypatch, tmp_path, tiny_eta):
    table = tmp_path / "eta.npy"
    table.write_bytes(tiny_eta.read_bytes())
    sidecar = tmp_path / "eta.json"
    sidecar.write_bytes(tiny_eta.with_suffix(".json").read_bytes())
    before = snapshot(tmp_path)
    metadata = json.loads(sidecar.read_text())
    values = np.load(table) + 1.0
    metadata["eta_sha256"] = table_digest(values)

    def failing_dump(document, handle, **kwargs):
        handle.write('{"format": "calibexport.eta_table", "num_')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(table_io.json, "dump", failing_dump)
    with pytest.raises(OSError, match="No space left"):
        table_io.save_eta_table(table, values, metadata)
    assert snapshot(tmp_path) == before
    assert load_eta_table(table).sha256 == json.loads(sidecar.read_text())["eta_sha256"]


def test_half_replaced_table_is_rejected(monkeypatch, tmp_path, tiny_eta):
    # A crash between the two renames leaves a new eta.npy beside the old sidecar.
    table = tmp_path / "eta.npy"
    table.write_bytes(tiny_eta.read_bytes())
    (tmp_path / "eta.json").write_bytes(tiny_eta.with_suffix(".json").read_bytes())
    metadata = json.loads((tmp_path / "eta.json").read_text())
    values = np.load(table) + 1.0
    metadata["eta_sha256"] = table_digest(values)

    real_replace = table_io.os.replace
    calls = []

    def replace_once(source, target):
        calls.append(target)
        if len(calls) > 1:
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(table_io.os, "replace", replace_once)
    with pytest.raises(KeyboardInterrupt):
        table_io.save_eta_table(table, values, metadata)
    monkeypatch.undo()

    assert hidden_entries(tmp_path) == []
    with pytest.raises(CalibexportError, match="does not match its sidecar"):
        load_eta_table(table)


def table_digest(values: np.ndarray) -> str:
    from calibexport.hashing import sha256_array

    return sha256_array(np.asarray(values, dtype=np.float32))
