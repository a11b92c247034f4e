"""Writing files and directories whole or not at all: into a temporary sibling, renamed into place when
complete, removed if the write fails, so an interrupted write never leaves something that looks finished."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def file_written_whole(path: Path, mode: str = "w") -> Iterator[IO]:
    """An open temporary file beside ``path`` (``mode`` "w" or "wb"), renamed to ``path`` when the block
    completes; the directory must exist."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def directory_written_whole(dst: Path) -> Iterator[Path]:
    """A temporary sibling directory to write ``dst``'s files into, renamed to ``dst`` when the block
    completes. ``dst`` must not exist, or be empty (callers check it first)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_directory() -> Path:
    """moerun's cache directory: ``$MOERUN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/moerun``, else
    ``~/.cache/moerun`` (not created here)."""
    if os.environ.get("MOERUN_CACHE_DIR"):
        return Path(os.environ["MOERUN_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "moerun"
    return Path.home() / ".cache" / "moerun"
