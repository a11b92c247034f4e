"""Quantized models: moerun.quantize against dequantized float weights, checkpoints that load back exactly,
mixed precision under a budget, the lean runner, and the quantize command's refusals."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import moerun
from families import FAMILIES
from moerun import cli
from moerun.models import convert
from moerun.models.convert import quantize_checkpoint
from moerun.models.loader import default_model_dir
from moerun.models.quantized import QuantConfig, QuantLinear, expert_nbytes, moe_layers, quantize
from moerun.quant.formats import QuantFormat, quantize_weight
from moerun.runtime.lean import make_lean_runner
from tiny_checkpoints import one_thread, save_checkpoint  # noqa: F401  (one_thread: autouse fixture)

REFERENCE = default_model_dir()


def _round_trip_weights(model: nn.Module, fmt: QuantFormat) -> None:
    """Replace every weight quantize() touches by its quantized-then-dequantized float value, in place."""
    with torch.no_grad():
        for layer in moe_layers(model).values():
            for w in (layer.experts.gate_up, layer.experts.down, layer.shared_gate_up, layer.shared_down):
                if w is not None:
                    w.copy_(quantize_weight(w, fmt).dequantize(w.dtype))
        for m in model.modules():
            if type(m) is nn.Linear:
                m.weight.copy_(quantize_weight(m.weight, fmt).dequantize(m.weight.dtype))


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_model_matches_dequantized_weights(family, tmp_path):
    """Every MoE layer and linear quantize() replaced computes what the float module does with the
    round-tripped weights. Module by module, because a whole model's routing can flip on near-ties: the
    decode path's products quantize x to int8 in blocks of 64, which moves outputs by up to ~1e-2 of their
    scale."""
    path = save_checkpoint(family, tmp_path / family)
    quantized = moerun.load(path, dtype="fp32").model
    reference = moerun.load(path, dtype="fp32").model
    layout = quantize(quantized, QuantConfig(bits=8))
    _round_trip_weights(reference, QuantFormat(8))
    assert all(f == "int8" for formats in layout["experts"].values() for f in formats)
    floats = dict(reference.named_modules())
    linears = {name: m for name, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    assert linears
    widths = {**{n: m.hidden_size for n, m in moe_layers(quantized).items()},
              **{n: floats[n].in_features for n in linears}}  # fmt: skip
    modules = dict(quantized.named_modules())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, width in widths.items():
            x = torch.randn(5, width, generator=gen)
            got, want = modules[name](x), floats[name](x)
            torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("q") / "int4"
    quantize_checkpoint(REFERENCE, dst, QuantConfig(bits=4, group_size=64, symmetric=False), dtype="fp32")
    return dst


def test_checkpoint_loads_back_exactly(int4_dir, tmp_path):
    in_memory = moerun.load(REFERENCE, dtype="fp32").model
    quantize(in_memory, QuantConfig(bits=4, group_size=64, symmetric=False))
    loaded = moerun.load(int4_dir, dtype="fp32")
    assert loaded.model.moerun_quant["experts"]["model.layers.0.mlp.layer"] == ["int4-g64-asym"] * 8
    assert loaded.stats.model_bytes < 0.5 * moerun.load(REFERENCE, dtype="fp32").stats.model_bytes
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, in_memory(ids).logits)
    # the lean runner reads the same low-bit weights; its one-row products quantize x to int8 in blocks (the
    # documented decode path), which moves fp32 logits by up to ~6e-2 (on logits up to ~15)
    runner = make_lean_runner(loaded.model)
    logits = runner.prefill(ids[0, :-1])
    with torch.no_grad():
        full = loaded.model(ids).logits[0]
    torch.testing.assert_close(logits, full[-2], rtol=0, atol=3e-2)
    torch.testing.assert_close(runner.decode(int(ids[0, -1])), full[-1], rtol=0, atol=1e-1)


def _digest(path: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file())).hexdigest()


def test_source_untouched_and_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(REFERENCE, src)
    before = _digest(src)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "dst", QuantConfig(bits=8))
    assert not (tmp_path / "dst").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial directory left behind
    assert _digest(src) == before


def test_mixed_precision_stays_within_budget(tmp_path):
    uniform = moerun.load(REFERENCE).model
    quantize(uniform, QuantConfig(bits=4))
    budget = expert_nbytes(uniform)
    summary = quantize_checkpoint(REFERENCE, tmp_path / "mixed", QuantConfig(bits=4), memory_budget=budget)
    assert summary["expert_bytes"] <= budget
    formats = {f for fs in summary["layout"]["experts"].values() for f in fs}
    assert len(formats) > 1  # the allocator traded group sizes / bits between experts
    loaded = moerun.load(tmp_path / "mixed")
    assert expert_nbytes(loaded.model) == summary["expert_bytes"]
    assert moerun.evaluate(loaded, ["def add(a, b):\n    return a + b\n"]).perplexity < 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{src}", "{src}/inside"], "inside"),
        (["{src}", "{existing}"], "already exists"),
        (["{src}", "{dst}", "--bits", "3"], "--bits must be 8 or 4"),
        (["{src}", "{dst}", "--group-size", "16"], "group size"),
        (["{src}", "{dst}", "--memory-budget", "1KB"], "below the smallest possible allocation"),
        (["{src}", "{dst}", "--memory-budget", "lots"], "lots"),
        (["{missing}", "{dst}"], "does not exist"),
    ],
)
def test_quantize_command_refusals(args, message, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("user data")
    names = {"src": REFERENCE, "dst": tmp_path / "dst", "existing": existing, "missing": tmp_path / "nope"}
    code = cli.main(["quantize", *(a.format(**names) for a in args)])
    assert code == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "dst").exists()
    assert (existing / "keep.txt").read_text() == "user data"


def test_quantize_command_writes_a_checkpoint(tmp_path, capsys):
    assert cli.main(["quantize", str(REFERENCE), str(tmp_path / "q8"), "--bits", "8"]) == 0
    assert "32 x int8" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(tmp_path / "q8")]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_a_tied_float_head_beside_low_bit_experts_is_saved_and_loads_back(tmp_path) -> None:
    """The reference model ties its head to the embedding: with dense matrices left in float both are stored."""
    config = QuantConfig(bits=4, dense_bits=16)
    quantize_checkpoint(REFERENCE, tmp_path / "q", config, dtype="fp32")
    expected = moerun.load(REFERENCE, "fp32").model
    quantize(expected, config)
    ids = torch.arange(1, 30).view(1, -1)
    with torch.no_grad():
        assert torch.equal(moerun.load(tmp_path / "q", "fp32").model(ids).logits, expected(ids).logits)


@pytest.mark.parametrize("mixed", [False, True])
def test_int4_layouts_made_at_load_are_those_first_use_makes(mixed, monkeypatch) -> None:
    """``make_int4_layouts`` converts every int4 expert (stacked or a format per expert) where torch runs them;
    after one token (which converts the dense matrices) a forward converts nothing and gives the same logits as
    converting on use."""
    from families import family_config, model_of_config
    from moerun.kernels import native
    from moerun.models.quantized import make_int4_layouts

    config = family_config("olmoe")
    config.intermediate_size = 64  # int4 needs K a multiple of 64 (the down projection's K)

    def quantized():
        model = model_of_config(config)
        moerun.patch(model)
        per_expert = None
        if mixed:
            names = ["int4-g32", "int8", "int4-g64-asym"]
            per_expert = {n: [names[e % 3] for e in range(layer.num_experts)] for n, layer in moe_layers(model).items()}
        quantize(model, QuantConfig(bits=4, group_size=32, expert_formats=per_expert))
        return model

    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    lazy = quantized()
    with torch.inference_mode():
        expected = lazy(ids).logits
    eager = quantized()
    made = make_int4_layouts(eager)
    if native.is_available():
        assert made == 0
        return
    int4_experts = sum(f.bits == 4 for layer in moe_layers(eager).values() for f in layer.experts.formats)
    assert made == 2 * int4_experts  # gate_up and down of every int4 expert
    with torch.inference_mode():
        eager(ids[:, :1])  # the dense matrices convert at their first use
    monkeypatch.setattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)  # any conversion now fails
    with torch.inference_mode():
        torch.testing.assert_close(eager(ids).logits, expected, rtol=0, atol=0)
