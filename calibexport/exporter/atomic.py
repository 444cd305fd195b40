"""Atomic writes of files and whole artifact directories.

A reader sees either the previous artifact or the complete new one, never a half-written one:
work happens in a temporary sibling (same parent, so ``os.replace`` is a rename on one file
system) that replaces the target only after everything inside it was written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from calibexport.errors import CalibexportError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_directory(final_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``final_dir`` when the block succeeds.

    The temporary directory is a sibling named ``.<final name>.tmp-XXXX``. If ``final_dir``
    exists and ``overwrite`` is False, raise CalibexportError before the block runs. When
    overwriting, the old directory is renamed aside and deleted only after the new one is in
    place. On any exception in the block, KeyboardInterrupt included, the temporary directory is
    removed, ``final_dir`` is left as it was and the exception propagates.
    """
    final_dir = Path(final_dir)
    if final_dir.exists() and not final_dir.is_dir():
        raise CalibexportError(
            f"output path {final_dir} exists and is not a directory; choose another --out."
        )
    if final_dir.exists() and not overwrite:
        raise CalibexportError(
            f"output directory {final_dir} already exists; pass --overwrite to replace it or "
            "choose another --out."
        )
    try:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    except OSError as error:
        raise CalibexportError(
            f"cannot create the output directory {final_dir}: {error}; choose another --out, or "
            f"check that {final_dir.parent} is a writable directory."
        ) from error
    try:
        # mkdtemp creates mode 0700; the artifact gets the mode a plain mkdir would give it.
        os.chmod(tmp_dir, 0o777 & ~_current_umask())
        yield tmp_dir
        _install_directory(tmp_dir, final_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _install_directory(tmp_dir: Path, final_dir: Path, overwrite: bool) -> None:
    """Move ``tmp_dir`` to ``final_dir``, keeping the old directory until the move succeeded."""
    old_dir = None
    if final_dir.exists():
        if not overwrite:
            raise CalibexportError(
                f"output directory {final_dir} appeared while the build ran; pass --overwrite to "
                "replace it or choose another --out."
            )
        old_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
    try:
        if old_dir is not None:
            os.replace(final_dir, old_dir)
        os.replace(tmp_dir, final_dir)
    except BaseException:
        # An interrupt can arrive just before or after either rename, so whether final_dir
        # exists decides what to restore, not the line that was reached.
        if old_dir is not None:
            if final_dir.exists():
                shutil.rmtree(old_dir, ignore_errors=True)
            else:
                os.replace(old_dir, final_dir)
        raise
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)
    logger.debug("Installed %s.", final_dir)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and os.replace."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(error, OSError):
            raise _write_error(path, error) from error
        raise


def _write_error(path: Path, error: OSError) -> CalibexportError:
    return CalibexportError(
        f"failed to write {path}: {error}; choose another output path, or check that "
        f"{path.parent} is a writable directory with free space."
    )


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode(encoding))
