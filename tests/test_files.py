"""Whole-or-nothing writes (moerun.files): modes under the umask, temporaries of killed writers removed by the
next write while those of running writers are kept, SIGTERM cleaned up as Ctrl-C is, and the lock that
serialises read-modify-write cycles of several processes."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from moerun import files
from moerun.files import directory_written_whole, file_written_whole

# A child process that loads files.py on its own (files.py imports nothing of moerun's, so the child starts
# in a fraction of a second, without torch) and runs one of the commands below.
CHILD = """
import importlib.util, json, sys, time
from pathlib import Path

spec = importlib.util.spec_from_file_location("files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
command, path = sys.argv[2], Path(sys.argv[3])
if command == "dir":  # start writing a directory, say so, wait to be killed
    with files.directory_written_whole(path) as tmp:
        (tmp / "model.safetensors").write_bytes(bytes(4096))
        print("writing", flush=True)
        time.sleep(60)
elif command == "file":
    with files.file_written_whole(path) as f:
        f.write("half a file")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
else:  # "count": increment the counter in the JSON file, 200 times, each a locked read-modify-write
    for _ in range(200):
        with files.locked(path):
            n = json.loads(path.read_text())["n"] if path.exists() else 0
            with files.file_written_whole(path) as f:
                json.dump({"n": n + 1}, f)
"""


def child(command: str, path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, files.__file__, command, str(path)], stdout=subprocess.PIPE, text=True
    )


def start_writer(kind: str, dst: Path) -> subprocess.Popen:
    """A child process in the middle of writing ``dst`` ("dir" or "file")."""
    writer = child(kind, dst)
    assert writer.stdout.readline() == "writing\n"
    return writer


def temporaries(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}."))


def write(kind: str, dst: Path, text: str = "done") -> None:
    """Write ``dst`` whole in this process."""
    if kind == "dir":
        with directory_written_whole(dst) as tmp:
            (tmp / "config.json").write_text(text)
    else:
        with file_written_whole(dst) as f:
            f.write(text)


def content(kind: str, dst: Path) -> str:
    return (dst / "config.json").read_text() if kind == "dir" else dst.read_text()


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_and_directories_follow_the_umask(tmp_path, mask: int) -> None:
    previous = os.umask(mask)
    try:
        write("file", tmp_path / "out.json")
        write("dir", tmp_path / "quantized")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "quantized").stat().st_mode) == 0o777 & ~mask


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_sigterm_while_writing_leaves_nothing_behind(tmp_path, kind: str) -> None:
    dst = tmp_path / "int4"
    writer = start_writer(kind, dst)
    assert temporaries(dst)
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(timeout=30) == 128 + signal.SIGTERM
    assert temporaries(dst) == [] and not dst.exists()


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_next_write_removes_the_temporaries_of_a_killed_writer(tmp_path, kind: str) -> None:
    dst = tmp_path / "int4"
    writer = start_writer(kind, dst)
    writer.kill()  # SIGKILL: the writer cannot clean up
    writer.wait(timeout=30)
    assert temporaries(dst)
    write(kind, dst)
    assert temporaries(dst) == [] and content(kind, dst) == "done"


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_temporaries_of_a_running_writer_are_kept(tmp_path, kind: str) -> None:
    dst = tmp_path / "int4"
    writer = start_writer(kind, dst)
    try:
        left = temporaries(dst)
        write(kind, dst)
        assert set(left) <= set(temporaries(dst)) and content(kind, dst) == "done"
    finally:
        writer.kill()
        writer.wait(timeout=30)


def test_temporary_locked_by_a_writer_elsewhere_is_kept(tmp_path) -> None:
    """A temporary whose process id is not running here but whose lock is held (its writer runs in another PID
    namespace, say) is kept; once the lock is free it goes."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    stale = tmp_path / f".int4.partial-{dead_pid}-abcd1234"
    stale.mkdir()
    fd = os.open(stale, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        files.remove_stale_temporaries(tmp_path / "int4")
        assert stale.exists()
    finally:
        os.close(fd)
    files.remove_stale_temporaries(tmp_path / "int4")
    assert not stale.exists()


def test_locked_serialises_read_modify_write_across_processes(tmp_path) -> None:
    counter = tmp_path / "counter.json"
    counters = [child("count", counter) for _ in range(2)]
    assert [c.wait(timeout=60) for c in counters] == [0, 0]
    assert json.loads(counter.read_text()) == {"n": 400}
