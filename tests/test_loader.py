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
from raw_safetensors import edit_header
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


def test_checkpoint_tensors_outside_the_decoder_layers_are_ignored(olmoe_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(olmoe_dir / "model.safetensors")
    save_file({**tensors, "model.mtp_head.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((olmoe_dir / "config.json").read_text())
    assert moerun.load(tmp_path, dtype="fp32").stats.ignored_tensors == 1


def test_deepseek_v3_multi_token_prediction_layers_are_ignored(tmp_path: Path) -> None:
    """DeepSeek-V3 checkpoints hold num_nextn_predict_layers layers after the model's (layer 61 of 61)."""
    path = save_checkpoint("deepseek_v3", tmp_path / "ds3")
    tensors = load_file(path / "model.safetensors")
    save_file({**tensors, "model.layers.2.eh_proj.weight": torch.zeros(2, 2)}, path / "model.safetensors")
    assert moerun.load(path, dtype="fp32").stats.ignored_tensors == 1
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="belongs to layer 3, but config.json describes 2 layers"):
        moerun.load(path, dtype="fp32")


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


def _set_value(path: Path, name: str, value: float) -> None:
    tensors = load_file(path / "model.safetensors")
    tensors[name].view(-1)[5] = value
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "name", ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.experts.3.up_proj.weight"]
)
def test_nan_or_inf_in_a_weight_is_refused_naming_the_tensor(olmoe_dir: Path, tmp_path: Path, name, value) -> None:
    """Generation used to exit 0 with empty output: the argmax of NaN logits is token 0, EOS."""
    path = _copy_checkpoint(olmoe_dir, tmp_path / "ckpt")
    _set_value(path, name, value)
    for dtype in ("fp32", "bf16"):
        with pytest.raises(CheckpointError, match=rf"tensor {name} in model.safetensors contains NaN or infinite"):
            moerun.load(path, dtype=dtype)


def test_a_weight_that_overflows_bf16_is_refused_in_bf16(olmoe_dir: Path, tmp_path: Path) -> None:
    path = _copy_checkpoint(olmoe_dir, tmp_path / "ckpt")
    _set_value(path, "model.norm.weight", torch.finfo(torch.float32).max)  # rounds to infinity in bf16
    moerun.load(path, dtype="fp32")
    with pytest.raises(CheckpointError, match="tensor model.norm.weight in model.safetensors contains NaN"):
        moerun.load(path, dtype="bf16")


def _offsets_of(entries, name: str) -> list[int]:
    return next(entry for key, entry in entries if key == name)["data_offsets"]


def _point_at_neighbour(entries) -> None:
    """Expert 1's down projection read from expert 0's bytes (the same size)."""
    _offsets_of(entries, "model.layers.0.mlp.experts.1.down_proj.weight")[:] = _offsets_of(
        entries, "model.layers.0.mlp.experts.0.down_proj.weight"
    )


def _shift_by_two(entries) -> None:
    offsets = _offsets_of(entries, "model.layers.1.self_attn.o_proj.weight")
    offsets[:] = [offsets[0] + 2, offsets[1] + 2]


def _list_twice(entries) -> list:
    return [*entries, next((k, v) for k, v in entries if k == "model.norm.weight")]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: edit_header(p, _point_at_neighbour),
         r"is corrupt: tensor \S+experts\.[01]\.down_proj\.weight's data overlaps tensor \S+experts\.[01]\.down_proj"),
        (lambda p: edit_header(p, _shift_by_two), r"is corrupt: 2 bytes after tensor \S+ belong to no tensor"),
        (lambda p: p.write_bytes(p.read_bytes() + bytes(16)), "is corrupt: 16 bytes after the last tensor's data"),
        (lambda p: edit_header(p, _list_twice), "is corrupt: its header lists 'model.norm.weight' twice"),
    ],
)  # fmt: skip
def test_headers_are_as_strict_as_safetensors(olmoe_dir: Path, tmp_path: Path, damage, message: str) -> None:
    """Tensors must cover the data exactly, as safetensors.safe_open requires: these loaded silently."""
    path = _copy_checkpoint(olmoe_dir, tmp_path / "ckpt")
    damage(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        moerun.load(path, dtype="fp32")


def _rename(path: Path, old: str, new: str) -> None:
    tensors = load_file(path / "model.safetensors")
    tensors[new] = tensors.pop(old)
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize("budget", [None, "50%"])
@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("experts.7.down_proj", "experts.00.down_proj", "expert 0's down projection of model.layers.0.mlp.experts."),
        ("experts.2.gate_proj", "experts.2.w3", "expert 2's up projection of model.layers.0.mlp.experts.gate_up_"),
    ],
)  # fmt: skip
def test_two_tensors_filling_one_slice_are_refused(olmoe_dir: Path, tmp_path: Path, budget, old, new, message) -> None:
    """Counting elements took expert 0 filled twice for experts 0 and 7 filled once, leaving 7 all zeros."""
    path = _copy_checkpoint(olmoe_dir, tmp_path / "ckpt")
    _rename(path, f"model.layers.0.mlp.{old}.weight", f"model.layers.0.mlp.{new}.weight")
    with pytest.raises(CheckpointError, match=rf"tensors \S+ and \S+ in model.safetensors both fill {message}"):
        moerun.load(path, dtype="fp32", memory_budget=budget)


def test_an_expert_index_spelled_differently_fills_its_expert(olmoe_dir: Path, tmp_path: Path) -> None:
    path = _copy_checkpoint(olmoe_dir, tmp_path / "ckpt")
    _rename(path, "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.experts.007.down_proj.weight")
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        expected = moerun.load(olmoe_dir, dtype="fp32").model(ids).logits
        assert torch.equal(moerun.load(path, dtype="fp32").model(ids).logits, expected)


def test_a_tensor_in_two_shards_is_refused(olmoe_dir: Path, tmp_path: Path) -> None:
    path = _copy_checkpoint(olmoe_dir, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").rename(path / "model-1.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, path / "model-2.safetensors")
    weight_map = {name: "model-1.safetensors" for name in tensors} | {"model.norm.weight": "model-2.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="tensor model.norm.weight is in both model-1.safetensors and model-2"):
        moerun.load(path, dtype="fp32")


@pytest.mark.parametrize("budget", [None, "50%"])
def test_a_config_with_fewer_layers_than_the_checkpoint_is_refused(olmoe_dir: Path, tmp_path: Path, budget) -> None:
    """The second layer's tensors used to be dropped silently: a one-layer model ran."""
    path = _copy_checkpoint(olmoe_dir, tmp_path / "ckpt")
    _edit_config(path, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.\S+ in model\.safetensors belongs to layer 1, "
                                              r"but config\.json describes 1 layers"):  # fmt: skip
        moerun.load(path, dtype="fp32", memory_budget=budget)


def test_a_tensor_with_no_place_in_its_layer_is_refused(olmoe_dir: Path, tmp_path: Path) -> None:
    """The OLMoE checkpoint described as Mixtral: Mixtral has no q_norm / k_norm, which were dropped silently."""
    path = _copy_checkpoint(olmoe_dir, tmp_path / "ckpt")
    _edit_config(path, model_type="mixtral", num_local_experts=8)
    message = r"tensor model\.layers\.0\.self_attn\.[qk]_norm\.weight in model\.safetensors has no place in layer 0"
    with pytest.raises(CheckpointError, match=message + r" of the model config\.json describes \(mixtral\)"):
        moerun.load(path, dtype="fp32")
