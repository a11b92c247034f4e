"""A safetensors file as its header entries and data bytes, to corrupt checkpoints precisely in tests."""

from __future__ import annotations

import json
from pathlib import Path


def read_raw(file: Path) -> tuple[list[tuple[str, object]], bytes]:
    """The header's (name, entry) pairs in file order, ``__metadata__`` included, and the data bytes."""
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    return list(header.items()), raw[8 + length :]


def encode(entries: list[tuple[str, object]], data: bytes) -> bytes:
    """A file's bytes from header pairs (a name may repeat) and data, the header padded with spaces to 8 bytes
    as safetensors writes it."""
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in entries) + "}"
    header = text.encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data


def write_raw(file: Path, entries: list[tuple[str, object]], data: bytes) -> None:
    file.write_bytes(encode(entries, data))


def edit_header(file: Path, edit) -> None:
    """Rewrite ``file`` with ``edit(entries)`` applied to its header pairs (in place, or returning new ones),
    its data bytes kept as they are."""
    entries, data = read_raw(file)
    entries = edit(entries) or entries
    write_raw(file, entries, data)
