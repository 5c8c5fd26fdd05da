"""Atomic file writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from planner.errors import DistplanError


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    _atomic_write(Path(path), text, "w")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """atomic_write_text for bytes (pictures)."""
    _atomic_write(Path(path), data, "wb")


def check_writable(path: Path, what: str = "output") -> None:
    """Raise a DistplanError naming `what` unless the atomic writes above can write `path`: it is not a
    folder or other non-file, and its folder (or the nearest existing one above, under which they create
    the rest) is a folder this process may write. Nothing is created."""
    path = Path(path)
    try:
        if path.is_dir():
            raise DistplanError(f"{what} '{path}' is a folder; name a file to write")
        if path.exists() and not path.is_file():
            raise DistplanError(f"{what} '{path}' exists and is not a regular file; name a file to write")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise DistplanError(f"{what} '{path}': '{folder}' is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise DistplanError(f"{what} '{path}': folder '{folder}' is not writable")
    except OSError as exc:
        raise DistplanError(f"{what} '{path}': {exc.strerror or exc}") from None


def _atomic_write(path: Path, data: str | bytes, mode: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DistplanError(f"cannot write '{path}': {exc.strerror or exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DistplanError(f"cannot write '{path}': {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
