"""Writing files and directories whole or not at all: into a temporary sibling, renamed into place when
complete, removed if the write fails, so an interrupted write never leaves something that looks finished.

A temporary is named after its destination and the writing process (``.NAME.PID-XXXXXXXX.tmp`` for a file,
``.NAME.partial-PID-XXXXXXXX`` for a directory) and locked (``flock``) while it is written. A process killed
mid-write (SIGKILL) cannot remove its temporary, so every write first removes the temporaries of its
destination whose process is gone and whose lock is free; SIGTERM during a write is turned into ``SystemExit``
so the temporary is removed as on Ctrl-C. What is renamed into place gets the mode a plain ``open`` or
``mkdir`` would give it under the process's umask.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, since setting it to read it is process-wide)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``'s lock file (``NAME.lock`` beside it), so that read-modify-write cycles of
    two processes on ``path`` do not interleave; the directory is created if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def _remove_if_unlocked(path: Path) -> None:
    """Remove the temporary ``path`` unless a process still holds its lock (one in another PID namespace)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    finally:
        os.close(fd)


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries that writes of ``path`` left beside it in processes that no longer run (killed
    by SIGKILL or a power cut); those of running writers are kept. Errors are ignored: this is tidying."""
    name = re.escape(path.name)
    pattern = re.compile(rf"\.{name}\.(\d+)-[a-z0-9_]+\.tmp|\.{name}\.partial-(\d+)-[a-z0-9_]+")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink():
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            _remove_if_unlocked(Path(entry.path))


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit inside the block (as SIGINT raises KeyboardInterrupt), so that the write's
    cleanup runs. Only in the main thread, and only where SIGTERM still has its default action."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def file_written_whole(path: Path, mode: str = "w") -> Iterator[IO]:
    """An open temporary file beside ``path`` (``mode`` "w" or "wb"), renamed to ``path`` when the block
    completes with mode 0o666 less the umask; the directory must exist."""
    remove_stale_temporaries(path)
    with _sigterm_exits():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0o600
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
    completes with mode 0o777 less the umask. ``dst`` must not exist, or be empty (callers check it first)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst)
    with _sigterm_exits():
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent))
        fd = None
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield tmp
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0o700
            if dst.exists():
                dst.rmdir()
            os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if fd is not None:
                os.close(fd)


def cache_directory() -> Path:
    """moerun's cache directory: ``$MOERUN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/moerun``, else
    ``~/.cache/moerun`` (not created here)."""
    if os.environ.get("MOERUN_CACHE_DIR"):
        return Path(os.environ["MOERUN_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "moerun"
    return Path.home() / ".cache" / "moerun"
