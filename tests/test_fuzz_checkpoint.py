"""Seeded random corruptions of a tiny checkpoint: every case ends in one clean error or in the intact model.

Each case copies a tiny OLMoE checkpoint (2 layers, 8 experts), corrupts it one way, loads it (every fourth
case with a memory budget, so experts are read from storage) and runs a fixed prompt. The outcome must be a
``CheckpointError``, a ``ValueError`` or an ``OSError`` with a one-line message, or logits equal to the
intact model's bit for bit: never another exception, a hang or other logits.

Corruptions are of the kinds that make a checkpoint wrong, or that change nothing it means (a respelled
expert index, reordered header entries, metadata, an unknown tensor outside the decoder layers). Edits that
give another valid model (two same-sized tensors' offsets swapped, a finite value changed, a config's top-k
or head count changed with every shape still matching) cannot be told from a real checkpoint and are not
drawn.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import moerun
from moerun.models.loader import CheckpointError
from raw_safetensors import encode, read_raw
from tiny_checkpoints import one_thread, save_checkpoint  # noqa: F401  (one_thread: autouse fixture)

CASES = 240
IDS = torch.tensor([[3, 17, 64, 99, 5, 127, 42, 8]])
CASE_SECONDS = 20  # a case still running after this long counts as a hang
FILE = "model.safetensors"


@dataclass
class Checkpoint:
    """A checkpoint being corrupted: header pairs and data, or the file's raw bytes once edited as bytes."""

    entries: list[tuple[str, object]]
    data: bytes
    config: dict
    raw: bytes | None = None
    config_text: str | None = None

    def file_bytes(self) -> bytes:
        return self.raw if self.raw is not None else encode(self.entries, self.data)

    def tensors(self) -> list[tuple[int, str, dict]]:
        """(position in entries, name, entry) of every tensor."""
        return [(i, k, v) for i, (k, v) in enumerate(self.entries) if k != "__metadata__"]

    def write(self, src: Path, dst: Path) -> None:
        shutil.copytree(src, dst)
        (dst / FILE).write_bytes(self.file_bytes())
        (dst / "config.json").write_text(self.config_text if self.config_text is not None else json.dumps(self.config))


def _nbytes(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


# ---- corruptions: each edits a Checkpoint in place -----------------------------------------------------------


def header_bit_flip(rng: random.Random, ck: Checkpoint) -> None:
    raw = bytearray(ck.file_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    at = rng.randrange(8) if rng.random() < 0.1 else rng.randrange(8, header_end)
    raw[at] ^= 1 << rng.randrange(8)
    ck.raw = bytes(raw)


def truncate(rng: random.Random, ck: Checkpoint) -> None:
    raw = ck.file_bytes()
    ck.raw = raw[: rng.choice([rng.randrange(len(raw)), len(raw) - rng.randint(1, 8)])]


def append_bytes(rng: random.Random, ck: Checkpoint) -> None:
    ck.raw = ck.file_bytes() + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def shift_one(rng: random.Random, ck: Checkpoint) -> None:
    _, _, entry = rng.choice(ck.tensors())
    k = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
    entry["data_offsets"] = [entry["data_offsets"][0] + k, entry["data_offsets"][1] + k]


def shift_all(rng: random.Random, ck: Checkpoint) -> None:
    k = rng.choice([-2, 1, 2, 4, 8])
    for _, _, entry in ck.tensors():
        entry["data_offsets"] = [entry["data_offsets"][0] + k, entry["data_offsets"][1] + k]


def point_at_another(rng: random.Random, ck: Checkpoint) -> None:
    """A tensor's offsets set to another's (of the same size when there is one): two tensors, one range."""
    tensors = ck.tensors()
    _, name, entry = rng.choice(tensors)
    same = [e for _, n, e in tensors if n != name and _nbytes(e) == _nbytes(entry)]
    other = rng.choice(same or [e for _, n, e in tensors if n != name])
    entry["data_offsets"] = list(other["data_offsets"])


def swap_offsets(rng: random.Random, ck: Checkpoint) -> None:
    """Two tensors of different sizes trade offsets (same-sized ones would make another valid checkpoint)."""
    tensors = ck.tensors()
    _, _, a = rng.choice(tensors)
    b = rng.choice([e for _, _, e in tensors if _nbytes(e) != _nbytes(a)])
    a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]


def edit_dtype(rng: random.Random, ck: Checkpoint) -> None:
    _, _, entry = rng.choice(ck.tensors())
    dtype = rng.choice(["F16", "BF16", "F64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "I64", "F33", "f32", "", 32, None])
    entry["dtype"] = dtype
    shape = entry["shape"]
    ratio = {"F16": 2, "BF16": 2, "I8": 4, "U8": 4, "BOOL": 4, "F8_E4M3": 4, "F64": 0.5, "I64": 0.5}.get(dtype)
    if ratio and rng.random() < 0.7 and (shape[-1] * ratio) % 1 == 0:  # keep the byte size: only the type is wrong
        shape[-1] = int(shape[-1] * ratio)


def edit_shape(rng: random.Random, ck: Checkpoint) -> None:
    _, _, entry = rng.choice(ck.tensors())
    shape = entry["shape"]
    choice = rng.randrange(7)
    if choice == 0:
        entry["shape"] = shape[::-1]  # same size; the same shape only for a square tensor
    elif choice == 1:
        entry["shape"] = [1, *shape]
    elif choice == 2:
        entry["shape"] = [math.prod(shape)]
    elif choice == 3:
        shape[rng.randrange(len(shape))] += rng.choice([-1, 1])
    elif choice == 4:
        shape[0] = rng.choice([-shape[0], float(shape[0]), str(shape[0]), True, None])
    elif choice == 5:
        entry["shape"] = []
    else:
        entry["shape"] = [*shape[:-1], shape[-1] // 2, 2] if shape[-1] % 2 == 0 else [*shape, 1]


def _layer_experts(name: str) -> tuple[str, str, str] | None:
    """(prefix up to experts., index, rest) of an expert tensor's name."""
    head, sep, tail = name.partition(".experts.")
    if not sep:
        return None
    index, _, rest = tail.partition(".")
    return head + sep, index, rest


_PROJ_SPELLINGS = ["gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate_projx", "Up_proj"]


def _renamed(rng: random.Random, name: str, names: list[str]) -> str:
    """Another name for tensor ``name``: the same slot respelled, another tensor's slot, or no slot at all."""
    expert = _layer_experts(name)
    choice = rng.randrange(9)
    if choice == 0:
        return rng.choice([n for n in names if n != name])  # an existing name
    if choice == 1 and expert:
        head, index, rest = expert
        return f"{head}{'0' * rng.randint(1, 2)}{index}.{rest}"  # the same expert, respelled: loads the same
    if choice == 2 and expert:
        head, index, rest = expert
        other = rng.choice([i for i in range(8) if str(i) != index] + [8, 12])
        return f"{head}{rng.choice(['', '0'])}{other}.{rest}"
    if choice == 3 and expert:
        head, index, rest = expert
        return f"{head}{index}.{rng.choice(_PROJ_SPELLINGS)}.weight"
    if choice == 4 and ".mlp." in name:
        return name.replace(".mlp.", ".block_sparse_moe.")  # Mixtral's spelling of the same module: loads
    if choice == 5 and name.startswith("model.layers."):
        layer = name.split(".")[2]
        return name.replace(f"model.layers.{layer}.", f"model.layers.{rng.choice([0, 1, 2, 5, 10])}.", 1)
    if choice == 6:
        return name + rng.choice(["x", ".weight", "_"])
    if choice == 7:
        return rng.choice(["model.extra.weight", "lm_head.bias", "model.layers.0.extra.weight", ""])
    return name.upper() if rng.random() < 0.5 else name.replace("weight", "bias")


def rename(rng: random.Random, ck: Checkpoint) -> None:
    names = [n for _, n, _ in ck.tensors()]
    i, name, entry = rng.choice(ck.tensors())
    ck.entries[i] = (_renamed(rng, name, names), entry)


def duplicate(rng: random.Random, ck: Checkpoint) -> None:
    """A tensor's bytes copied to the end of the data under another (or the same) name."""
    names = [n for _, n, _ in ck.tensors()]
    _, name, entry = rng.choice(ck.tensors())
    begin, end = entry["data_offsets"]
    start = len(ck.data)
    ck.data += ck.data[begin:end]
    copy = {**entry, "shape": list(entry["shape"]), "data_offsets": [start, start + end - begin]}
    new_name = name if rng.random() < 0.2 else _renamed(rng, name, names)
    ck.entries.append((new_name, copy))


def nan_or_inf(rng: random.Random, ck: Checkpoint) -> None:
    _, _, entry = rng.choice(ck.tensors())
    begin, end = entry["data_offsets"]
    value = struct.pack("<f", rng.choice([math.nan, math.inf, -math.inf]))
    data = bytearray(ck.data)
    for _ in range(rng.choice([1, 1, 3])):
        at = begin + 4 * rng.randrange((end - begin) // 4)
        data[at : at + 4] = value
    ck.data = bytes(data)


def harmless(rng: random.Random, ck: Checkpoint) -> None:
    """Changes nothing the checkpoint means: header order, metadata."""
    choice = rng.randrange(3)
    if choice == 0:
        rng.shuffle(ck.entries)
    elif choice == 1:
        ck.entries = [(k, v) for k, v in ck.entries if k != "__metadata__"]
    else:
        ck.entries = [(k, {"format": "pt", "note": "x" * rng.randrange(20)}) if k == "__metadata__" else (k, v)
                      for k, v in ck.entries]  # fmt: skip


# Config edits: values a model of these shapes cannot have (refused), and fields that change no logits.
_CONFIG_EDITS = [
    *(("num_hidden_layers", v) for v in (1, 3, 0, -1, "2", None, 2.5, True)),
    *(("num_experts", v) for v in (4, 9, 0, -8, "8", None)),
    *(("hidden_size", v) for v in (32, 65, 0, -64, "64")),
    *(("intermediate_size", v) for v in (16, 33, 0, -32)),
    *(("vocab_size", v) for v in (64, 129, 0, -1)),
    *(("num_experts_per_tok", v) for v in (0, -1, 9, "2", None, 2.5)),
    *(("num_attention_heads", v) for v in (3, 0, -4)),
    *(("num_key_value_heads", v) for v in (3, 0)),
    *(("model_type", v) for v in ("llama", "mixtral", "qwen3_moe", "deepseek_v3", "", 7, None)),
    *(("hidden_act", v) for v in ("nonsense", 3)),
    *(("rms_norm_eps", v) for v in ("small", None)),
    *(("architectures", v) for v in (["X"], None)),
    *(("use_cache", v) for v in (False,)),
    *(("eos_token_id", v) for v in (5,)),
    *(("some_unknown_field", v) for v in (1, "x")),
]


def edit_config(rng: random.Random, ck: Checkpoint) -> None:
    if rng.random() < 0.15:
        text = json.dumps(ck.config)
        ck.config_text = rng.choice([text[: rng.randrange(len(text))], "[]", "null", '{"model_type": 1}', ""])
        return
    key, value = rng.choice(_CONFIG_EDITS)
    ck.config[key] = value


CORRUPTIONS: list[Callable[[random.Random, Checkpoint], None]] = [
    header_bit_flip,
    header_bit_flip,
    truncate,
    append_bytes,
    shift_one,
    shift_all,
    point_at_another,
    swap_offsets,
    edit_dtype,
    edit_shape,
    rename,
    rename,
    duplicate,
    duplicate,
    nan_or_inf,
    harmless,
    edit_config,
    edit_config,
]


# ---- the cases -----------------------------------------------------------------------------------------------


class Hang(BaseException):
    """A case ran past CASE_SECONDS (a BaseException, so that no ``except Exception`` swallows it)."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(path: Path, memory_budget: str | None) -> torch.Tensor:
    loaded = moerun.load(path, "fp32", memory_budget=memory_budget)
    try:
        with torch.no_grad():
            return loaded.model(IDS).logits
    finally:
        if loaded.cache is not None:
            loaded.cache.close()


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    path = save_checkpoint("olmoe", tmp_path_factory.mktemp("intact"))
    return path, run(path, None)


def corrupt(seed: int, intact_dir: Path, dst: Path) -> str:
    """Write a corrupted copy of ``intact_dir`` to ``dst``; returns what was done."""
    rng = random.Random(seed)
    entries, data = read_raw(intact_dir / FILE)
    ck = Checkpoint(entries, data, json.loads((intact_dir / "config.json").read_text()))
    done = []
    for _ in range(2 if rng.random() < 0.15 else 1):
        corruption = rng.choice(CORRUPTIONS)
        if ck.raw is not None and corruption in (header_bit_flip, truncate, append_bytes):
            continue  # raw edits come last: the header cannot be parsed again
        corruption(rng, ck)
        done.append(corruption.__name__)
    ck.write(intact_dir, dst)
    return "+".join(done)


def test_the_intact_model_runs_offloaded_to_the_same_logits(intact) -> None:
    path, logits = intact
    assert torch.equal(run(path, "50%"), logits)


@pytest.mark.parametrize("seed", range(CASES))
def test_a_corrupted_checkpoint_is_refused_cleanly_or_loads_unchanged(seed: int, intact, tmp_path: Path) -> None:
    intact_dir, expected = intact
    what = corrupt(seed, intact_dir, tmp_path / "ckpt")
    budget = "50%" if seed % 4 == 3 else None
    try:
        with deadline(CASE_SECONDS):
            logits = run(tmp_path / "ckpt", budget)
    except (ValueError, OSError) as e:
        clean = isinstance(e, CheckpointError) or type(e) in (ValueError, OSError)
        assert clean, f"{what}: {type(e).__name__} is not one of moerun's errors: {e}"
        message = str(e)
        assert message and "\n" not in message, f"{what}: the error is not one line: {message!r}"
        return
    assert torch.equal(logits, expected), f"{what} (memory budget {budget}) loaded with other logits"
