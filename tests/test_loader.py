"""moerun.load: whole checkpoints of every family load exactly, in little memory, and bad ones fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, OlmoeConfig

import moerun
from families import FAMILIES
from moerun.models.hf import PatchedMoEBlock
from moerun.models.loader import (
    CheckpointError,
    _build_empty_model,
    checkpoint_tensors,
    load_weights,
    read_config,
)
from tiny_checkpoints import one_thread, save_checkpoint  # noqa: F401  (one_thread: autouse fixture)


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> Path:
    return save_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory) -> Path:
    return save_checkpoint("olmoe", tmp_path_factory.mktemp("olmoe"), tokenizer=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_match_from_pretrained(family_dir: Path, dtype: torch.dtype) -> None:
    """Before patching, the model holds exactly what transformers' from_pretrained loads, dtypes included."""
    model = _build_empty_model(read_config(family_dir), dtype)
    assert load_weights(model, checkpoint_tensors(family_dir)) == 0
    expected = AutoModelForCausalLM.from_pretrained(family_dir, dtype=dtype).state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


def test_load_patches_every_moe_block(family_dir: Path) -> None:
    loaded = moerun.load(family_dir, dtype="fp32")
    model = loaded.model
    assert not model.training and loaded.tokenizer is None
    assert sum(isinstance(m, PatchedMoEBlock) for m in model.modules()) == model.config.num_hidden_layers
    reference = AutoModelForCausalLM.from_pretrained(family_dir).eval()
    ids = torch.randint(0, 128, (1, 13), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected, actual = reference(ids).logits, model(ids).logits
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
    stats = loaded.stats
    assert stats.shards == 1 and stats.tensors > 0 and stats.ignored_tensors == 0
    assert stats.model_bytes == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def test_tied_embeddings_and_shards(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(save_checkpoint("qwen3_moe", tmp_path / "src"))
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied", max_shard_size="100KB")
    assert len(list((tmp_path / "tied").glob("*.safetensors"))) > 2
    loaded = moerun.load(tmp_path / "tied", dtype=torch.float32)
    assert loaded.stats.shards > 2
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert torch.equal(loaded.model.lm_head.weight, model.model.embed_tokens.weight)


def test_checkpoint_tensors_it_has_no_place_for_are_ignored(olmoe_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(olmoe_dir / "model.safetensors")
    save_file({**tensors, "model.layers.9.mtp_head.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((olmoe_dir / "config.json").read_text())
    assert moerun.load(tmp_path, dtype="fp32").stats.ignored_tensors == 1


def test_tokenizer_is_loaded(olmoe_dir: Path) -> None:
    loaded = moerun.load(olmoe_dir, dtype="bf16")
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("héllo")) == "héllo"
    assert loaded.model.dtype == torch.bfloat16 and loaded.max_seq_len == 512


def test_peak_memory_stays_close_to_the_model_size(tmp_path: Path) -> None:
    """A 224 MiB fp32 OLMoE in five shards, loaded as bf16 (the dtype-converting path) in a fresh process."""
    config = OlmoeConfig(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=4096,
        intermediate_size=256, num_experts=32, num_experts_per_tok=4, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=0, pad_token_id=1, bos_token_id=None,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)  # any value: only memory is measured
    model.save_pretrained(tmp_path, max_shard_size="64MB")
    del model
    script = textwrap.dedent(f"""
        import json, moerun
        import transformers.models.olmoe.modeling_olmoe  # imported before, so only loading is measured
        s = moerun.load({str(tmp_path)!r}, dtype="bf16", threads=1).stats
        print(json.dumps({{"ratio": s.peak_over_model, "model": s.model_bytes, "shards": s.shards}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["shards"] == 5 and stats["model"] > 100 * 2**20
    assert stats["ratio"] < 1.3, f"loading added {stats['ratio']:.2f}x the model's size"


# ---- bad input ---------------------------------------------------------------------------------------------


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(exist_ok=True)
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 1000])


def _garble_header(path: Path) -> None:
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:20] = b"#not json!#!"
    (path / "model.safetensors").write_bytes(bytes(data))


def _huge_header_length(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + data[8:])


def _reshape_tensor(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.gate.weight"] = torch.zeros(4, 64)
    save_file(tensors, path / "model.safetensors")


def _drop_tensor(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, path / "model.safetensors")


def _quantize_tensor(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    save_file(tensors, path / "model.safetensors")


def _shard_index_to_missing_file(path: Path) -> None:
    names = list(load_file(path / "model.safetensors"))
    weight_map = {
        name: "model-00002-of-00002.safetensors" if i else "model.safetensors" for i, name in enumerate(names)
    }
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "config.json").unlink(), "has no config.json"),
        (lambda p: (p / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda p: _edit_config(p, model_type="llama"), "'llama' is not a supported MoE architecture; supported: "),
        (lambda p: (p / "config.json").write_text('{"hidden_size": 64}'), "config.json has no model_type"),
        (lambda p: _edit_config(p, quantization_config={"quant_method": "mxfp4"}), "quantized checkpoints (mxfp4)"),
        (lambda p: _edit_config(p, num_experts="eight"), "Field 'num_experts' expected int, got str"),
        (lambda p: _edit_config(p, hidden_size=-3), "config.json describes no buildable model"),
        (lambda p: (p / "tokenizer.json").write_text("{bad"), "cannot load the tokenizer in"),
        (lambda p: (p / "generation_config.json").write_text("{bad"), "generation_config.json: "),
        (lambda p: (p / "model.safetensors").unlink(), "has no model.safetensors or model.safetensors.index.json"),
        (_truncate, "model.safetensors is truncated: tensor "),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x01\x02"), "is truncated: 2 bytes"),
        (_garble_header, "model.safetensors is corrupt: unparsable header"),
        (_huge_header_length, "is corrupt: header length field"),
        (
            _reshape_tensor,
            "tensor model.layers.0.mlp.gate.weight in model.safetensors has shape [4, 64], expected [8, 64]",
        ),
        (_drop_tensor, "missing tensors the model needs: model.layers.1.self_attn.q_proj.weight"),
        (_quantize_tensor, "tensor model.norm.weight in model.safetensors is I8"),
        (_shard_index_to_missing_file, "shard model-00002-of-00002.safetensors listed in"),
    ],
)
def test_bad_checkpoints_raise_checkpoint_error(olmoe_dir: Path, tmp_path: Path, damage, message: str) -> None:
    path = _copy_checkpoint(olmoe_dir, tmp_path / "ckpt")
    damage(path)
    with pytest.raises(CheckpointError) as error:
        moerun.load(path, dtype="fp32")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_directory_and_bad_dtype(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        moerun.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="unsupported dtype 'fp8'; choose from bf16, fp32"):
        moerun.load(tmp_path, dtype="fp8")
    assert issubclass(CheckpointError, ValueError)


def test_wrong_expert_count(olmoe_dir: Path, tmp_path: Path) -> None:
    """A config with fewer experts than the checkpoint names the first expert that does not fit."""
    path = _copy_checkpoint(olmoe_dir, tmp_path / "ckpt")
    _edit_config(path, num_experts=4)
    with pytest.raises(CheckpointError, match=r"experts\.4\.\w+\.weight: expert 4 does not exist; the model has 4"):
        moerun.load(path, dtype="fp32")
