"""Load whole Hugging Face MoE checkpoints into transformers models whose MoE blocks run through moerun.

A checkpoint directory holds ``config.json``, safetensors weights (one ``model.safetensors``, or
``model.safetensors.index.json`` and its shards) and usually tokenizer files. :func:`load` checks what
it reads: before building anything, that the config's ``model_type`` is a supported MoE family and that
every shard's header is as strict as the safetensors format requires (entries parse, no name twice, the
tensors' byte ranges cover the data exactly: no overlap, gap or trailing bytes); before copying each
tensor, its dtype and shape; after, that its values are finite. Every checkpoint tensor must fill a slice
of the model no other tensor fills (two spellings of one expert are refused) or lie outside the decoder
layers the config describes (then it is ignored); every slice of the model must be filled. Problems raise
:class:`CheckpointError` naming the file, the tensor and what is wrong.

Memory: the model is built with uninitialised parameters (pages nothing has written to cost no RAM),
then each tensor is read with ``readinto`` straight into its parameter, or, when the dtype changes,
16 MiB at a time through a scratch buffer. Memory-mapping the shards instead leaves every page read
resident in this process until its shard is closed: on a 224 MiB (fp32) OLMoE checkpoint transformers'
``from_pretrained`` (mmap) added 2.09x the model's size at its peak in fp32 and 4.06x in bf16; this loader
adds 1.04x in fp32 and 1.13x in bf16. ``patch`` shares the weights of every family but GPT-OSS, whose
experts it re-lays out; patching one decoder layer at a time bounds that extra copy to one layer's experts.

Shape legend: E experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, MemoryBudgetError
from ..kernels.finite import all_finite
from ..offload.cache import ExpertCache
from ..offload.offloaded import offload_experts
from ..routing import ExpertSkipping
from .hf import FAMILIES, SUPPORTED_BLOCKS, UNSUPPORTED_FAMILIES, patch
from .quantized import (
    QUANT_FILE,
    QUANT_FORMAT_VERSION,
    apply_quant_layout,
    config_record,
    model_nbytes,
    moe_layers,
    quantize,
)
from .run_plan import PlanError, RunPlan, read_plan

# config.json model_type -> family name, for the families whose MoE blocks moerun replaces.
SUPPORTED_MODEL_TYPES = {f.model_type: f.name for f in FAMILIES}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit: a larger length field means a corrupt file

# safetensors dtype codes -> torch dtypes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FLOAT_SOURCES = ("F64", "F32", "F16", "BF16")
_SCRATCH_BYTES = 16 << 20  # dtype conversion reads through a buffer of this size

# Checkpoints store routed experts one by one; transformers (>= 5) fuses them into experts.gate_up_proj
# [E, 2I, H] (gate rows, then up rows) and experts.down_proj [E, H, I]. Mixtral names the projections
# w1 (gate), w3 (up), w2 (down) under block_sparse_moe instead of mlp.
_EXPERT_KEY = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>[0-9]+)\.(?P<proj>\w+)\.weight$")
# A decoder layer's tensors: each must have a place in the model (see _check_unplaced).
_LAYER_KEY = re.compile(r"^model\.layers\.(?P<index>[0-9]+)\.")
# transformers' fused expert stacks: what a memory budget leaves in the checkpoint.
_FUSED_EXPERT_SUFFIXES = ("experts.gate_up_proj", "experts.down_proj")
_EXPERT_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def _one_line(error: Exception) -> str:
    """An exception's message on one line (transformers' validation messages span several)."""
    return " ".join(str(error).split())


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lives in a safetensors file."""

    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class LoadStats:
    """What loading cost.

    ``peak_rss_bytes`` is the process's peak resident memory while loading (Linux VmHWM, reset when loading
    starts), ``rss_before_bytes`` the resident memory just before; their difference is what loading added.
    """

    seconds: float
    model_bytes: int
    rss_before_bytes: int
    peak_rss_bytes: int
    shards: int
    tensors: int
    ignored_tensors: int  # in the checkpoint but not in the model (e.g. DeepSeek-V3's multi-token head)

    @property
    def peak_over_model(self) -> float:
        """Memory loading added at its peak, as a multiple of the model's size."""
        return (self.peak_rss_bytes - self.rss_before_bytes) / self.model_bytes


@dataclass
class LoadedModel:
    """A loaded checkpoint: the model (eval mode, MoE blocks patched), its tokenizer (None if the directory
    has no tokenizer files), config, load statistics and, with a memory budget, the expert cache."""

    model: nn.Module
    tokenizer: object | None
    config: object
    stats: LoadStats
    path: Path
    cache: ExpertCache | None = None  # the expert cache when loaded with a memory budget
    plan: RunPlan | None = None  # the run plan it was loaded with

    @property
    def max_seq_len(self) -> int:
        """The model's context length (config.max_position_embeddings)."""
        return int(self.config.max_position_embeddings)


def reset_peak_rss() -> None:
    """Reset this process's peak resident memory (VmHWM) to its current value; Linux only, else a no-op."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _proc_status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # no /proc (macOS): the process's lifetime peak stands in for both fields

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes, Linux KiB


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last :func:`reset_peak_rss`, in bytes."""
    return _proc_status_bytes("VmHWM")


def rss_bytes() -> int:
    """Current resident memory of this process, in bytes."""
    return _proc_status_bytes("VmRSS")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.bfloat16 / torch.float32 or their names "bf16" / "fp32"; anything else raises ValueError."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise ValueError(f"unsupported dtype {dtype!r}; choose from {', '.join(DTYPES)}")


def default_model_dir() -> Path:
    """The reference model shipped with moerun (moerun.assets.REFERENCE_MODEL_DIR).

    Raises:
        CheckpointError: this installation of moerun has no reference model.
    """
    try:
        from ..assets import REFERENCE_MODEL_DIR
    except ImportError:
        REFERENCE_MODEL_DIR = None
    if REFERENCE_MODEL_DIR is None or not Path(REFERENCE_MODEL_DIR).is_dir():
        raise CheckpointError("no model directory given and moerun's reference model is not installed")
    return Path(REFERENCE_MODEL_DIR)


def read_config(path: Path):
    """The transformers config of the checkpoint at ``path``, checked to be a supported MoE family.

    Raises:
        CheckpointError: config.json is missing, not valid JSON, not a supported MoE model, or quantized.
    """
    from transformers import AutoConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    supported = ", ".join(f"{name} ({t})" for t, name in SUPPORTED_MODEL_TYPES.items())
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise CheckpointError(f"{config_file} has no model_type; supported MoE families: {supported}")
    model_type = raw["model_type"]
    if model_type in UNSUPPORTED_FAMILIES:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not supported: {UNSUPPORTED_FAMILIES[model_type]}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not a supported MoE architecture; supported: {supported}"
        )
    if raw.get("quantization_config"):
        quantization = raw["quantization_config"]
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise CheckpointError(f"{config_file}: quantized checkpoints ({method}) are not supported; use bf16 weights")
    if model_type == "deepseek_v2" and raw.get("topk_method", "greedy") != "greedy":
        raise CheckpointError(f"{config_file}: DeepSeek-V2 topk_method {raw['topk_method']!r} is not supported")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises many types for bad field values
        raise CheckpointError(f"{config_file}: {_one_line(e)}") from None


def read_safetensors_header(file: Path) -> dict[str, TensorRecord]:
    """The tensors listed in a safetensors file's header, checked against the file's size.

    Raises:
        CheckpointError: the file is truncated (shorter than its header says) or its header is corrupt.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file} is truncated: {size} bytes, shorter than the 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{file} is corrupt: header length field reads {header_len} bytes")
        if 8 + header_len > size:
            raise CheckpointError(f"{file} is truncated: its header needs {header_len} bytes, the file has {size}")
        header_bytes = f.read(header_len)
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise CheckpointError(f"{file} is corrupt: its header lists {e.key!r} twice") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt: unparsable header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is corrupt: its header is not a JSON object")
    data_start = 8 + header_len
    records = {}
    ranges = []  # (begin, end, name), relative to the data
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            itemsize = _SAFETENSORS_DTYPES[dtype].itemsize
            # bool is an int to Python, not to the format
            ok = all(type(v) is int and v >= 0 for v in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or end - begin != math.prod(shape) * itemsize:
            raise CheckpointError(f"{file} is corrupt: bad header entry for tensor {name}: {entry}")
        if data_start + end > size:
            raise CheckpointError(
                f"{file} is truncated: tensor {name} ends at byte {data_start + end}, the file has {size}"
            )
        records[name] = TensorRecord(name, file, dtype, shape, data_start + begin, end - begin)
        ranges.append((begin, end, name))
    # As safetensors requires: the tensors, in offset order, cover the data from its first byte to the file's
    # end, each starting where the previous ends. A tensor pointing into another's bytes, or offsets shifted
    # by a few bytes, would otherwise load other bytes silently.
    at, previous = 0, None
    for begin, end, name in sorted(ranges):
        if begin < at:
            raise CheckpointError(f"{file} is corrupt: tensor {name}'s data overlaps tensor {previous}'s")
        if begin > at:
            where = f"after tensor {previous}" if previous is not None else "at the start of the data"
            raise CheckpointError(f"{file} is corrupt: {begin - at} bytes {where} belong to no tensor")
        at, previous = end, name
    if data_start + at != size:
        raise CheckpointError(f"{file} is corrupt: {size - data_start - at} bytes after the last tensor's data")
    return records


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook refusing a key given twice (json.loads would keep the last silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def checkpoint_tensors(path: Path) -> dict[str, TensorRecord]:
    """Every tensor of the checkpoint at ``path`` (single file or index + shards), headers validated.

    Raises:
        CheckpointError: no safetensors weights, a malformed index, a missing, truncated or corrupt shard.
    """
    index_file = path / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            shard_of = {str(k): str(v) for k, v in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index_file} is corrupt: {type(e).__name__}: {e}") from None
        shards = list(dict.fromkeys(shard_of.values()))
    elif (path / SINGLE_FILE).is_file():
        shard_of, shards = None, [SINGLE_FILE]
    else:
        extra = " (.bin checkpoints are not supported; save as safetensors)" if any(path.glob("*.bin")) else ""
        raise CheckpointError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}{extra}")
    records: dict[str, TensorRecord] = {}
    for shard in shards:
        file = path / shard
        if not file.is_file():
            raise CheckpointError(f"shard {shard} listed in {index_file} is missing")
        for name, record in read_safetensors_header(file).items():
            if name in records:
                raise CheckpointError(f"tensor {name} is in both {records[name].file.name} and {file.name}")
            records[name] = record
    for name, shard in (shard_of or {}).items():
        if name not in records or records[name].file.name != Path(shard).name:
            raise CheckpointError(f"{index_file} lists tensor {name} in {shard}, which does not contain it")
    return records


@dataclass(frozen=True)
class _Placement:
    """Where a checkpoint tensor goes: model tensor ``target``, the view of it filled, and which slice that
    is: None for the whole tensor, else (expert, "gate" | "up" | "down") of a fused expert stack."""

    target: str
    dest: torch.Tensor
    slice: tuple[int, str] | None = None


@functools.cache
def _renamings(model_type: str) -> tuple:
    """transformers' own renamings of ``model_type``'s checkpoint tensors (older names of the same tensors,
    which its loader maps on reading), or none where this transformers has no such table."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return ()
    return tuple(t for t in get_checkpoint_conversion_mapping(model_type) or [] if isinstance(t, WeightRenaming))


def _renamed(name: str, model_type: str | None) -> str:
    """``name`` under transformers' renamings for ``model_type`` (unchanged where none applies)."""
    if not model_type or not _renamings(model_type):
        return name
    from transformers.core_model_loading import apply_renamings

    return apply_renamings(name, list(_renamings(model_type)))


def _placement(name: str, targets: dict[str, torch.Tensor], model_type: str | None = None) -> _Placement | None:
    """Where a checkpoint tensor goes (under its own name or transformers' renaming of it for ``model_type``),
    or None if the model has no place for it."""
    if name in targets:
        return _Placement(name, targets[name])
    renamed = _renamed(name, model_type)
    if renamed != name and renamed in targets:
        return _Placement(renamed, targets[renamed])
    # Mixtral checkpoints keep its MoE block under block_sparse_moe; Granite models still have one there.
    name = name.replace(".block_sparse_moe.", ".mlp.")
    if name in targets:
        return _Placement(name, targets[name])
    match = _EXPERT_KEY.match(name)
    if match is None or match["proj"] not in _EXPERT_PROJ:
        return None
    part, index = _EXPERT_PROJ[match["proj"]], int(match["index"])
    target = f"{match['experts']}.{'down_proj' if part == 'down' else 'gate_up_proj'}"
    if target not in targets:
        return None
    fused = targets[target]  # gate_up [E, 2I, H] or down [E, H, I]
    if index >= fused.shape[0]:
        raise CheckpointError(f"tensor {name}: expert {index} does not exist; the model has {fused.shape[0]} experts")
    if part == "down":
        return _Placement(target, fused[index], (index, part))  # [H, I]
    half = fused.shape[1] // 2
    return _Placement(target, fused[index, :half] if part == "gate" else fused[index, half:], (index, part))  # [I, H]


def _expert_slices(target: str, tensor: torch.Tensor) -> list[tuple[int, str]] | None:
    """The (expert, projection) slices that fill a fused expert stack, or None for any other model tensor."""
    if target.endswith("experts.gate_up_proj"):
        return [(e, part) for e in range(tensor.shape[0]) for part in ("gate", "up")]
    if target.endswith("experts.down_proj"):
        return [(e, "down") for e in range(tensor.shape[0])]
    return None


def _check_unplaced(record: TensorRecord, config) -> None:
    """A checkpoint tensor the model has no place for is ignored only outside its decoder layers (and in
    DeepSeek-V3's multi-token prediction layers after them, which moerun does not use). In a layer the config
    does not have, or in one it has, it means the config does not describe the checkpoint: dropping it gave
    a model of fewer layers, or one without a tensor the checkpoint was trained with.

    Raises:
        CheckpointError: naming the tensor.
    """
    match = _LAYER_KEY.match(record.name)
    if match is None or record.name.endswith(".rotary_emb.inv_freq"):  # older checkpoints saved the rope buffer
        return
    layer, layers = int(match["index"]), int(config.num_hidden_layers)
    counts = [getattr(config, name, None) for name in ("num_nextn_predict_layers", "num_mtp_layers")]
    prediction_layers = next((count for count in counts if type(count) is int), 0)
    if layers <= layer < layers + prediction_layers:
        return
    if layer >= layers:
        raise CheckpointError(
            f"tensor {record.name} in {record.file.name} belongs to layer {layer}, but config.json describes "
            f"{layers} layers"
        )
    raise CheckpointError(
        f"tensor {record.name} in {record.file.name} has no place in layer {layer} of the model config.json "
        f"describes ({config.model_type})"
    )


class _Coverage:
    """Which slices of the model's tensors checkpoint tensors have filled, so that two checkpoint tensors
    filling the same slice (one expert's weight under two spellings) are refused, and unfilled slices are
    found by what was filled, not by counting elements."""

    def __init__(self, targets: dict[str, torch.Tensor]) -> None:
        self.targets = targets
        self.names_of: dict[int, list[str]] = {}  # tied parameters share one tensor; a checkpoint holds either
        for name, tensor in targets.items():
            self.names_of.setdefault(id(tensor), []).append(name)
        # per distinct model tensor: slice (None: whole) -> (checkpoint tensor, model tensor name) filling it
        self.filled: dict[int, dict[tuple[int, str] | None, tuple[str, str]]] = {key: {} for key in self.names_of}

    def add(self, record: TensorRecord, placed: _Placement) -> None:
        """Record that ``record`` fills ``placed``; a slice filled before is a CheckpointError."""
        filled = self.filled[id(self.targets[placed.target])]
        # a whole tensor clashes with any slice of it filled before, a slice with itself or the whole
        candidates = list(filled) if placed.slice is None else [placed.slice, None]
        clash = [s for s in candidates if s in filled]
        # Tied parameters: a checkpoint may hold the shared tensor under each of its names (as before).
        tied_alias = placed.slice is None and all(filled[s][1] != placed.target for s in clash)
        if clash and not tied_alias:
            what = placed.target
            if placed.slice is not None:
                what = f"expert {placed.slice[0]}'s {placed.slice[1]} projection of {placed.target}"
            raise CheckpointError(
                f"tensors {filled[clash[0]][0]} and {record.name} in {record.file.name} both fill {what}"
            )
        filled[placed.slice] = (record.name, placed.target)

    def missing(self) -> list[str]:
        """Model tensors, or slices of fused expert stacks, no checkpoint tensor filled."""
        out = []
        for key, names in self.names_of.items():
            filled, target = self.filled[key], names[0]
            if None in filled:
                continue
            slices = _expert_slices(target, self.targets[target])
            if not filled or slices is None:
                out.append(target)
            else:
                out += [f"{target} (expert {e}'s {part} projection)" for e, part in slices if (e, part) not in filled]
        return out


def _read_into(record: TensorRecord, f, dest: torch.Tensor, scratch: torch.Tensor) -> None:
    """Read one tensor's bytes into ``dest`` (contiguous, same shape) at the file's current position.

    A tensor stored in ``dest``'s dtype is read in place; another dtype is read a chunk at a time into
    ``scratch`` (uint8) and converted, so converting never holds a second copy of a whole tensor.
    """
    source_dtype = _SAFETENSORS_DTYPES[record.dtype]
    flat = dest.detach().view(-1)
    if source_dtype == dest.dtype:
        pieces = [(flat.view(torch.uint8), None)]
    else:
        per_chunk = scratch.numel() // source_dtype.itemsize
        pieces = [
            (scratch[: min(per_chunk, flat.numel() - start) * source_dtype.itemsize], flat[start : start + per_chunk])
            for start in range(0, flat.numel(), per_chunk)
        ]
    for raw, converted in pieces:
        if f.readinto(raw.numpy()) != raw.numel():
            raise CheckpointError(f"{record.file} is truncated: tensor {record.name} could not be read in full")
        if converted is not None:
            converted.copy_(raw.view(source_dtype))


def _check_finite(record: TensorRecord, dest: torch.Tensor) -> None:
    """A float tensor read must hold no NaN or infinity (read from the file, or made by converting to a
    narrower dtype): the model would run to NaN logits, whose argmax is token 0, silently."""
    if dest.is_floating_point() and not all_finite(dest):
        raise CheckpointError(f"tensor {record.name} in {record.file.name} contains NaN or infinite values")


def _check_float_record(record: TensorRecord, dest: torch.Tensor) -> None:
    """A float checkpoint's tensor must have its destination's shape and a float dtype (converted on reading)."""
    if tuple(dest.shape) != record.shape:
        raise CheckpointError(
            f"tensor {record.name} in {record.file.name} has shape {list(record.shape)}, expected {list(dest.shape)}"
        )
    if record.dtype not in _FLOAT_SOURCES:
        raise CheckpointError(
            f"tensor {record.name} in {record.file.name} is {record.dtype}; moerun loads "
            f"{'/'.join(_FLOAT_SOURCES)} weights (quantized checkpoints are not supported)"
        )


def _check_exact_record(record: TensorRecord, dest: torch.Tensor) -> None:
    """A quantized checkpoint's tensor must have its destination's shape, and its dtype unless both are float."""
    source = _SAFETENSORS_DTYPES[record.dtype]
    if tuple(dest.shape) != record.shape or (source != dest.dtype and record.dtype not in _FLOAT_SOURCES):
        raise CheckpointError(
            f"tensor {record.name} in {record.file.name} is {record.dtype} {list(record.shape)}, "
            f"expected {dest.dtype} {list(dest.shape)}"
        )


def _expert_destination(
    record: TensorRecord, dest: torch.Tensor, check: Callable[[TensorRecord, torch.Tensor], None]
) -> tuple[Path, int, torch.dtype, torch.Tensor]:
    """A checkpoint tensor left in its file for the expert cache, checked as loading it would be checked."""
    check(record, dest)
    return record.file, record.offset, _SAFETENSORS_DTYPES[record.dtype], dest


def load_weights(model: nn.Module, records: dict[str, TensorRecord], skip: frozenset[str] = frozenset()) -> int:
    """Fill every parameter and persistent buffer of ``model`` from the checkpoint's tensors, in place.

    Reads file by file in offset order. Returns the number of checkpoint tensors the model has no place for.
    Model tensors named in ``skip`` are left unfilled (their checkpoint tensors are not read, but must fill
    them as completely and as uniquely as if they were).

    Raises:
        CheckpointError: a tensor with the wrong shape or a non-float dtype, NaN or infinite values, two
            tensors filling one slice of the model, a tensor of a decoder layer that has no place for it
            (:func:`_check_unplaced`), or slices of the model left unfilled.
    """
    targets = model.state_dict(keep_vars=True)
    coverage = _Coverage(targets)
    ignored = 0
    scratch = torch.empty(_SCRATCH_BYTES, dtype=torch.uint8)
    by_file: dict[Path, list[TensorRecord]] = {}
    for record in records.values():
        by_file.setdefault(record.file, []).append(record)
    with torch.no_grad():
        for file, file_records in by_file.items():
            with open(file, "rb", buffering=0) as f:
                for record in sorted(file_records, key=lambda r: r.offset):
                    placed = _placement(record.name, targets, model.config.model_type)
                    if placed is None:
                        _check_unplaced(record, model.config)
                        ignored += 1
                        continue
                    coverage.add(record, placed)
                    if placed.target in skip:
                        continue
                    _check_float_record(record, placed.dest)
                    f.seek(record.offset)
                    _read_into(record, f, placed.dest, scratch)
                    _check_finite(record, placed.dest)
    missing = coverage.missing()
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint is missing tensors the model needs: {shown}")
    return ignored


def load_exact(targets: dict[str, torch.Tensor], records: dict[str, TensorRecord]) -> int:
    """Fill ``targets`` from the checkpoint tensors of the same names (a quantized checkpoint, which moerun
    wrote under its own module names). Float tensors convert to the target dtype; others must match it.

    Returns:
        the number of checkpoint tensors with no target.

    Raises:
        CheckpointError: a tensor with the wrong shape or dtype, NaN or infinite float values, or targets the
            checkpoint lacks.
    """
    missing = [name for name in targets if name not in records]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"quantized checkpoint is missing tensors the model needs: {shown}")
    scratch = torch.empty(_SCRATCH_BYTES, dtype=torch.uint8)
    by_file: dict[Path, list[TensorRecord]] = {}
    for name, record in records.items():
        if name in targets:
            by_file.setdefault(record.file, []).append(record)
    with torch.no_grad():
        for file, file_records in by_file.items():
            with open(file, "rb", buffering=0) as f:
                for record in sorted(file_records, key=lambda r: r.offset):
                    dest = targets[record.name]
                    _check_exact_record(record, dest)
                    f.seek(record.offset)
                    _read_into(record, f, dest, scratch)
                    _check_finite(record, dest)
    return sum(name not in targets for name in records)


def read_quant_layout(path: Path) -> dict | None:
    """The quant layout of a moerun quantized checkpoint, or None for a float checkpoint."""
    file = path / QUANT_FILE
    if not file.is_file():
        return None
    try:
        layout = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {_one_line(e)}") from None
    if not isinstance(layout, dict) or layout.get("format_version") != QUANT_FORMAT_VERSION:
        found = layout.get("format_version") if isinstance(layout, dict) else None
        raise CheckpointError(
            f"{file}: quantized checkpoint format version {found}, this moerun reads version "
            f"{QUANT_FORMAT_VERSION}; quantize the float checkpoint again with this moerun"
        )
    if not isinstance(layout.get("experts"), dict) or not isinstance(layout.get("dense"), dict):
        raise CheckpointError(f"{file} lacks the 'experts' and 'dense' format tables")
    return layout


def _build_empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The transformers model for ``config`` with uninitialised parameters (computed buffers are real)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights():  # also skips tying, which transformers does in init_weights
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # a config transformers accepted but cannot build from (bad field values)
        raise CheckpointError(f"config.json describes no buildable model: {_one_line(e)}") from None
    model.tie_weights()
    # transformers keeps some tensors (DeepSeek-V3's e_score_correction_bias) in fp32 whatever the dtype.
    keep_fp32 = getattr(model, "_keep_in_fp32_modules_strict", None) or []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point() and any(part in name for part in keep_fp32):
            module_name, _, attr = name.rpartition(".")
            fp32 = tensor.detach().float()
            module = model.get_submodule(module_name)
            setattr(module, attr, nn.Parameter(fp32) if isinstance(tensor, nn.Parameter) else fp32)
    return model


def _patch_layer_by_layer(model: nn.Module) -> None:
    """moerun.patch, one decoder layer at a time, so that layouts patch() copies (GPT-OSS) free the
    transformers copy before the next layer's is made."""
    for layer in model.model.layers:
        if any(type(m).__name__ in SUPPORTED_BLOCKS for m in layer.modules()):
            patch(layer)


def has_tokenizer(path: Path) -> bool:
    """Whether the checkpoint directory has tokenizer files."""
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(path: Path):
    """The tokenizer in ``path``, or None when the directory has no tokenizer files.

    Raises:
        CheckpointError: tokenizer files exist but cannot be loaded.
    """
    if not has_tokenizer(path):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers' Rust errors have no common Python base class
        raise CheckpointError(f"cannot load the tokenizer in {path}: {_one_line(e)}") from None


def _read_generation_config(path: Path):
    """generation_config.json (EOS ids and sampling defaults), or None when the directory has none."""
    if not (path / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except Exception as e:  # JSON and validation errors of several types
        raise CheckpointError(f"{path / 'generation_config.json'}: {_one_line(e)}") from None


def load(
    path: str | Path | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    threads: int | None = None,
    memory_budget: str | int | None = None,
    cache_policy: str = "lfu",
    prefetch: bool = True,
    plan: RunPlan | str | Path | dict | None = None,
) -> LoadedModel:
    """Load a Hugging Face MoE checkpoint directory, ready to run through moerun.

    Args:
        path: directory with config.json, safetensors weights and tokenizer files; None for moerun's
            reference model.
        dtype: parameter dtype: torch.bfloat16 / torch.float32 or "bf16" / "fp32".
        threads: CPU threads for torch (default: leave torch's setting).
        memory_budget: keep the routed experts in the checkpoint's files and run them through an expert
            cache of this many bytes (an int, or "6GB", "512MiB", "40%" of the experts' bytes); the rest
            of the model is resident. See :mod:`moerun.offload`.
        cache_policy: with a memory budget, the eviction policy: ``lfu`` or ``lru``.
        prefetch: with a memory budget, read each next layer's predicted experts in the background.
        plan: a run plan (``moerun plan``: a file path, a dict or a ``RunPlan``) that sets the formats, the
            expert cache, expert skipping and the threads; ``memory_budget``, ``cache_policy``, ``prefetch`` and
            ``threads`` must then be left as they are. ``path`` is the checkpoint the plan was made for, or the
            one ``moerun quantize --plan`` wrote from it; a float checkpoint is quantized after loading (its
            peak memory is then the float model's), which a plan that reads experts from storage cannot do.

    Returns:
        a :class:`LoadedModel`; its ``model`` is a transformers CausalLM in eval mode with every MoE block
        replaced by moerun's (:func:`moerun.patch`).

    Raises:
        CheckpointError: a missing directory or file, an unsupported architecture, a truncated or corrupt
            shard, a tensor of the wrong shape or dtype, missing tensors.
    """
    dtype = parse_dtype(dtype)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    path = default_model_dir() if path is None else Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    if plan is not None:
        return _load_planned(path, dtype, read_plan(plan), memory_budget, threads)
    config = read_config(path)
    records = checkpoint_tensors(path)
    tokenizer = load_tokenizer(path)
    generation_config = _read_generation_config(path)
    if threads is not None:
        torch.set_num_threads(threads)

    start = time.perf_counter()
    rss_before = rss_bytes()
    reset_peak_rss()
    layout = read_quant_layout(path)
    model = _build_empty_model(config, dtype)
    destinations = []  # with a memory budget: (file, offset, dtype, storage filled) per checkpoint tensor
    if layout is None:
        skip = frozenset()
        if memory_budget is not None:
            if config.model_type == "gpt_oss":
                raise CheckpointError(
                    "a memory budget needs GPT-OSS experts in moerun's layout: run moerun quantize first"
                )
            targets = model.state_dict(keep_vars=True)
            skip = frozenset(name for name in targets if name.endswith(_FUSED_EXPERT_SUFFIXES))
            for record in records.values():
                placed = _placement(record.name, targets, config.model_type)
                if placed is not None and placed.target in skip:
                    destinations.append(_expert_destination(record, placed.dest, _check_float_record))
        ignored = load_weights(model, records, skip)
        _patch_layer_by_layer(model)
    else:  # moerun wrote it: patch first, give the layers their low-bit layout, fill by name
        _patch_layer_by_layer(model)
        try:
            targets = apply_quant_layout(model, layout)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / QUANT_FILE}: {_one_line(e)}") from None
        for name, record in records.items():
            if name not in targets:
                _check_unplaced(record, model.config)
        if memory_budget is not None:
            named = [name for name in records if name in targets]
            destinations = [_expert_destination(records[n], targets[n], _check_exact_record) for n in named]
    cache = None
    if memory_budget is not None:
        try:
            cache = offload_experts(list(moe_layers(model).values()), destinations, memory_budget, cache_policy,
                                    prefetch)  # fmt: skip
        except MemoryBudgetError:
            raise  # about the budget, not the checkpoint
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path}: {_one_line(e)}") from None
    if layout is not None:  # experts left in the checkpoint are not read
        consumed = {named[i] for i in cache.store.consumed} if cache is not None else set()
        ignored = load_exact({n: t for n, t in targets.items() if n not in consumed}, records) - len(consumed)
    model.eval()
    if generation_config is not None:
        model.generation_config = generation_config
    stats = LoadStats(
        seconds=time.perf_counter() - start,
        model_bytes=model_nbytes(model),
        rss_before_bytes=rss_before,
        peak_rss_bytes=peak_rss_bytes(),
        shards=len({r.file for r in records.values()}),
        tensors=len(records),
        ignored_tensors=ignored,
    )
    return LoadedModel(model, tokenizer, model.config, stats, path, cache)


def _load_planned(
    path: Path, dtype: torch.dtype, plan: RunPlan, memory_budget: str | int | None, threads: int | None
) -> LoadedModel:
    """``load`` with a run plan: check the model, then load with the plan's formats, cache and threads, and
    set its expert skipping."""
    from .skipping import set_skipping  # noqa: PLC0415  (skipping builds on the layers this module loads)

    if memory_budget is not None or threads is not None:
        raise ValueError("a plan sets the memory budget and the threads itself: give either the plan or those")
    plan.check_model(path)
    layout = read_quant_layout(path)
    if plan.quantized and layout is None and plan.cache_bytes is not None:
        raise PlanError(
            f"this plan reads low-bit experts from storage, and {path} holds float weights: write the checkpoint "
            f"it describes with moerun quantize --plan PLAN {path} DST, then load DST"
        )
    mixed_differs = plan.expert_formats is not None and layout is not None and layout["experts"] != plan.expert_formats
    if layout is not None and (layout.get("config") != config_record(plan.quant_config()) or mixed_differs):
        raise PlanError(f"{path} holds other formats than this plan's: quantize the float checkpoint with --plan")
    loaded = load(path, dtype, plan.threads, plan.cache_bytes, plan.cache_policy, plan.prefetch)
    if plan.quantized and layout is None:
        quantize(loaded.model, plan.quant_config())
    if plan.skip_thresholds is not None:
        set_skipping(loaded.model, {n: ExpertSkipping("threshold", b) for n, b in plan.skip_thresholds.items()})
    loaded.plan = plan
    return loaded


def join_tokens(texts: Sequence[str], tokenizer) -> list[int]:
    """The texts' token ids, with the tokenizer's EOS between consecutive texts (none if it has no EOS)."""
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    return ids
