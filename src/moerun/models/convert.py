"""``quantize_checkpoint``: a checkpoint directory in, a quantized checkpoint directory out.

The destination is assembled in a temporary sibling directory and renamed into place only when every
file is written, so an interrupted run leaves no directory that looks like a valid checkpoint; the
source is only read.
"""

from __future__ import annotations

import shutil
import sysconfig
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..files import directory_written_whole
from ..sizes import budget_bytes, format_size
from .loader import CheckpointError, join_tokens, load
from .mixed import choose_expert_formats
from .quantized import QUANT_FILE, QuantConfig, expert_nbytes, quant_layout_metadata, quantize, quantized_tensors
from .run_plan import PLAN_FILE, RunPlan

# Files copied from the source checkpoint as they are (the weights are rewritten).
_COPIED = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
)  # fmt: skip


def check_destination(src: Path, dst: Path) -> None:
    """Refuse a destination equal to or inside the source, or an existing non-empty one."""
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents:
        raise ValueError(f"the destination {dst} is the source directory or inside it; choose another")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"the destination {dst} already exists and is not an empty directory")


# Default calibration text: standard-library modules from the reference model's training corpus, none of
# its held-out evaluation files (calibrating on the evaluation text would flatter the mixed allocation).
DEFAULT_CALIBRATION_MODULES = ("argparse.py", "dataclasses.py", "string.py", "functools.py")


def default_calibration_files() -> list[Path]:
    """This Python's copies of ``DEFAULT_CALIBRATION_MODULES``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / name for name in DEFAULT_CALIBRATION_MODULES if (root / name).is_file()]
    if not files:
        raise ValueError("no calibration text: pass --calibration FILE")
    return files


def calibration_tokens(tokenizer, files: list[Path] | None, max_tokens: int) -> list[int]:
    """Tokens for calibration: the given text files, or ``default_calibration_files()``, through ``tokenizer``."""

    if tokenizer is None:
        raise ValueError("mixed precision needs calibration text, and this checkpoint has no tokenizer")
    texts = []
    for f in files or default_calibration_files():
        try:
            texts.append(Path(f).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise ValueError(f"cannot read calibration file {f}: {e.strerror}") from None
    return join_tokens(texts, tokenizer)[:max_tokens]


def save_quantized(
    model: nn.Module,
    layout: dict[str, object],
    dst: Path,
    copy_from: Path | None = None,
    progress: Callable[[str], None] | None = None,
    plan: RunPlan | None = None,
) -> None:
    """Write a model quantized in memory (``layout`` is what ``quantize`` returned) as the checkpoint ``dst``.

    Args:
        model: the quantized model.
        layout: its quant layout.
        dst: the new directory (must not exist, or be empty); written whole or not at all.
        copy_from: a checkpoint whose config, tokenizer and generation files are copied; None writes the
            model's config alone (a checkpoint without a tokenizer).
        progress: called with a line of text before the weights are written.
        plan: the run plan the checkpoint is written for, kept beside the weights (``PLAN_FILE``): it names the
            source model, so that the plan applies to the copy.
    """
    from ..version import __version__

    metadata = quant_layout_metadata(layout, __version__)
    tensors, seen = {}, set()
    for name, t in quantized_tensors(model).items():
        # A tied output head left in float shares the embedding's storage, which safetensors refuses: store a copy.
        tensors[name] = t.contiguous() if t.data_ptr() not in seen else t.clone()
        seen.add(t.data_ptr())
    with directory_written_whole(dst) as tmp:
        if copy_from is None:
            model.config.save_pretrained(tmp)
        else:
            for name in _COPIED:
                if (copy_from / name).is_file():
                    shutil.copy2(copy_from / name, tmp / name)
        if progress:
            progress(f"writing {len(tensors)} tensors")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", "moerun_quant": metadata})
        if plan is not None:
            plan.write(tmp / PLAN_FILE)
        (tmp / QUANT_FILE).write_text(metadata)  # last: its presence marks a complete quantized checkpoint


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    config: QuantConfig,
    *,
    memory_budget: str | int | None = None,
    calibration_files: list[Path] | None = None,
    calibration_tokens_max: int = 4096,
    dtype: str = "bf16",
    progress: Callable[[str], None] | None = None,
    plan: RunPlan | None = None,
) -> dict[str, object]:
    """Quantize the checkpoint in ``src`` and write it to ``dst`` (see the module docstring).

    Args:
        src: a Hugging Face MoE checkpoint directory moerun loads.
        dst: the new directory (must not exist, or be empty; not inside ``src``).
        config: formats to use.
        memory_budget: bytes for the routed experts (``"600MB"``, ``"35%"`` of their float size, or an
            int); with it, each expert's format is chosen by ``choose_expert_formats`` on calibration text.
        calibration_files: text files for mixed precision (default: ``default_calibration_files()``).
        calibration_tokens_max: at most this many calibration tokens.
        dtype: the float dtype kept for embeddings, norms and routers ("bf16" or "fp32").
        progress: called with a line of text per step (one per layer quantized).
        plan: write the formats of this run plan instead of ``config`` (which is then ignored), for the source
            model the plan was made for.

    Returns:
        a summary: the quant layout, bytes of experts before and after, total bytes written.

    Raises:
        ValueError / CheckpointError: bad arguments, an unreadable source, an impossible budget.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise CheckpointError(f"model directory {src} does not exist")
    check_destination(src, dst)
    if plan is not None:
        plan.check_model(src)
        if memory_budget is not None:
            raise ValueError("a plan sets the experts' formats itself: give either the plan or a memory budget")
        config = plan.quant_config()
    loaded = load(src, dtype=dtype)
    if getattr(loaded.model, "moerun_quant", None) is not None:
        raise ValueError(f"{src} is already a quantized checkpoint")
    model = loaded.model
    float_expert_bytes = expert_nbytes(model)
    if memory_budget is not None:
        budget = budget_bytes(memory_budget, float_expert_bytes)
        tokens = calibration_tokens(loaded.tokenizer, calibration_files, calibration_tokens_max)
        if progress:
            progress(f"calibrating on {len(tokens)} tokens for a {format_size(budget)} expert budget")
        formats = choose_expert_formats(
            model, tokens, budget, window=min(loaded.max_seq_len, 256),
            progress=progress and (lambda name: progress(f"scored {name}")),
        )  # fmt: skip
        config = replace(config, expert_formats=formats)
    layout = quantize(model, config, progress=progress and (lambda name: progress(f"quantized {name}")))
    save_quantized(model, layout, dst, copy_from=src, progress=progress, plan=plan)
    return {
        "layout": layout,
        "float_expert_bytes": float_expert_bytes,
        "expert_bytes": expert_nbytes(model),
        "file_bytes": (dst / "model.safetensors").stat().st_size,
    }
