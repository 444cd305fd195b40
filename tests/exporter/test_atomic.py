"""Atomic replacement of artifact directories and files."""

from __future__ import annotations

import os

import pytest

from calibexport.errors import CalibexportError
from calibexport.exporter.atomic import atomic_directory, atomic_write_bytes, atomic_write_text


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_directory_creates_target(tmp_path):
    final = tmp_path / "artifact"
    with atomic_directory(final, overwrite=False) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".artifact.tmp-")
        (tmp / "model.onnx").write_bytes(b"new")
        assert not final.exists()
    assert (final / "model.onnx").read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_atomic_directory_existing_without_overwrite(tmp_path):
    final = tmp_path / "artifact"
    final.mkdir()
    ran = []
    with pytest.raises(CalibexportError, match="pass --overwrite .* or choose another --out"):
        with atomic_directory(final, overwrite=False):
            ran.append(True)
    assert ran == []
    assert leftovers(tmp_path) == []


def test_atomic_directory_overwrite_replaces(tmp_path):
    final = tmp_path / "artifact"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("build failed"), KeyboardInterrupt()])
def test_atomic_directory_error_keeps_old(tmp_path, error):
    final = tmp_path / "artifact"
    final.mkdir()
    (final / "model.onnx").write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_directory(final, overwrite=True) as tmp:
            (tmp / "model.onnx").write_bytes(b"half")
            raise error
    assert (final / "model.onnx").read_bytes() == b"old"
    assert sorted(p.name for p in final.iterdir()) == ["model.onnx"]
    assert leftovers(tmp_path) == []


def test_atomic_directory_error_creates_nothing(tmp_path):
    final = tmp_path / "artifact"
    with pytest.raises(RuntimeError, match="build failed"):
        with atomic_directory(final, overwrite=False):
            raise RuntimeError("build failed")
    assert not final.exists()
    assert leftovers(tmp_path) == []


def test_atomic_directory_target_is_file(tmp_path):
    final = tmp_path / "artifact"
    final.write_text("not a directory")
    with pytest.raises(CalibexportError, match="is not a directory"):
        with atomic_directory(final, overwrite=True):
            pass
    assert final.read_text() == "not a directory"


def test_atomic_directory_mode_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "artifact", overwrite=False) as tmp:
            (tmp / "manifest.json").write_text("{}")
        atomic_write_text(tmp_path / "artifact" / "note.txt", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "artifact").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "artifact" / "note.txt").stat().st_mode & 0o777 == 0o644


def test_atomic_write_bytes_replaces(tmp_path):
    path = tmp_path / "sub" / "data.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.bin"]


def test_atomic_write_text_utf8(tmp_path):
    path = tmp_path / "note.txt"
    atomic_write_text(path, "eta \u03b7\n")
    assert path.read_text(encoding="utf-8") == "eta \u03b7\n"
