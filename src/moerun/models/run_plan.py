"""Run plans: how to run one model on one host, as ``moerun plan`` writes them and ``moerun.load(plan=...)``,
``generate``, ``eval``, ``bench`` and ``quantize --plan`` apply them.

A plan fixes the weight formats (experts uniform or per expert, attention and output head), whether the routed
experts stay resident or are read from the checkpoint through a cache of a given size, policy and prefetching,
expert skipping (a threshold per MoE layer) and the thread count. It records the model it was made for (a
digest of the checkpoint's config and tensor index) and the host (the tuning fingerprint), and what the
planner predicted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import file_written_whole
from .quantized import QUANT_FILE, QuantConfig

PLAN_FORMAT_VERSION = 1
PLAN_FILE = "moerun_plan.json"  # beside the weights of a checkpoint ``quantize --plan`` wrote


class PlanError(ValueError):
    """A plan file that cannot be read or does not fit the model."""


def model_identity(path: Path) -> str:
    """A digest of a float checkpoint: its config.json and the names, shapes, dtypes and sizes of its tensors.
    A checkpoint ``quantize --plan`` wrote carries the identity of its source (``PLAN_FILE``)."""
    from .loader import checkpoint_tensors  # the loader applies plans: import it where it is needed

    path = Path(path)
    written = path / PLAN_FILE
    if written.is_file() and (path / QUANT_FILE).is_file():
        try:
            return str(json.loads(written.read_text())["model_identity"])
        except (ValueError, KeyError, TypeError):
            raise PlanError(f"{written} is not a moerun plan") from None
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for name, record in sorted(checkpoint_tensors(path).items()):
        digest.update(f"{name}:{record.shape}:{record.dtype}:{record.nbytes}".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class RunPlan:
    """One configuration of a model on a host.

    Attributes:
        model_identity: ``model_identity`` of the float checkpoint the plan was made for.
        model_path: where it was, for people.
        host: the tuning fingerprint of the host it was planned on.
        threads: CPU threads.
        expert_bits: 16, 8 or 4 for uniform experts; None with ``expert_formats``.
        expert_formats: per MoE layer, one format name per expert (mixed precision), or None.
        dense_bits: attention and output head: 16, 8 or 4.
        group_size: int4 group size.
        cache_bytes: routed experts read from the checkpoint through a cache of this many bytes; None: resident.
        cache_policy: ``lfu`` or ``lru``.
        prefetch: read each next layer's predicted experts ahead.
        skip_thresholds: threshold skipping's beta per MoE layer name, or None for no skipping.
        predicted: what the planner predicted (decode and prefill tokens/s, peak bytes, KL, ...).
        workload: the prompt and decode lengths the prediction is for.
        basis: what the prediction rests on besides the host (shapes, cache replay, skipping, storage speed), so
            that ``moerun.plan.predict.repredict`` can predict the plan's speed on another host.
    """

    model_identity: str
    model_path: str
    host: str
    threads: int
    expert_bits: int | None
    expert_formats: dict[str, list[str]] | None
    dense_bits: int
    group_size: int = 32
    cache_bytes: int | None = None
    cache_policy: str = "lfu"
    prefetch: bool = True
    skip_thresholds: dict[str, float] | None = None
    predicted: dict = field(default_factory=dict)
    workload: dict = field(default_factory=dict)
    basis: dict = field(default_factory=dict)  # host-independent inputs of the prediction, to predict again elsewhere

    @property
    def quantized(self) -> bool:
        return self.expert_formats is not None or self.expert_bits != 16 or self.dense_bits != 16

    def quant_config(self) -> QuantConfig:
        """The ``QuantConfig`` that gives the plan's formats (``quantize``, ``quantize --plan``)."""
        return QuantConfig(
            bits=16 if self.expert_bits is None else self.expert_bits,
            group_size=self.group_size,
            dense_bits=self.dense_bits,
            expert_formats=self.expert_formats,
        )

    def to_dict(self) -> dict:
        return {"format_version": PLAN_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> RunPlan:
        if not isinstance(data, dict) or data.get("format_version") != PLAN_FORMAT_VERSION:
            raise PlanError(f"not a moerun plan of format version {PLAN_FORMAT_VERSION}")
        try:
            plan = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as e:
            raise PlanError(f"plan is missing a field: {e}") from None
        plan.validate()
        return plan

    def validate(self) -> None:
        """Raise PlanError for values no run can take."""
        if self.expert_formats is None and self.expert_bits not in (16, 8, 4):
            raise PlanError(f"plan expert_bits must be 16, 8 or 4, got {self.expert_bits}")
        if self.dense_bits not in (16, 8, 4):
            raise PlanError(f"plan dense_bits must be 16, 8 or 4, got {self.dense_bits}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise PlanError(f"plan threads must be >= 1, got {self.threads}")
        if self.cache_bytes is not None and (not isinstance(self.cache_bytes, int) or self.cache_bytes < 1):
            raise PlanError(f"plan cache_bytes must be a positive whole number, got {self.cache_bytes}")
        if self.cache_policy not in ("lfu", "lru"):
            raise PlanError(f"plan cache_policy must be lfu or lru, got {self.cache_policy!r}")
        for name, beta in (self.skip_thresholds or {}).items():
            if not isinstance(beta, int | float) or not 0.0 <= beta <= 1.0:
                raise PlanError(f"plan skip threshold of {name} must be in [0, 1], got {beta!r}")

    def write(self, path: Path) -> None:
        """Write the plan as JSON, whole or not at all."""
        with file_written_whole(Path(path).expanduser()) as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def read(cls, path: str | Path) -> RunPlan:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise PlanError(f"cannot read plan {path}: {e.strerror}") from None
        except ValueError as e:
            raise PlanError(f"plan {path} is not JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except PlanError as e:
            raise PlanError(f"plan {path}: {e}") from None

    def check_model(self, path: Path) -> None:
        """Refuse a checkpoint other than the one the plan was made for (or one ``quantize --plan`` wrote
        from it)."""
        identity = model_identity(path)
        if identity != self.model_identity:
            raise PlanError(
                f"this plan was made for another model ({self.model_path}, identity {self.model_identity}); "
                f"{path} has identity {identity}: plan it with moerun plan --model {path}"
            )


def read_plan(plan: RunPlan | str | Path | dict) -> RunPlan:
    """A plan given as a RunPlan, a dict, or the path of a plan file."""
    if isinstance(plan, RunPlan):
        plan.validate()
        return plan
    if isinstance(plan, dict):
        return RunPlan.from_dict(plan)
    return RunPlan.read(plan)
