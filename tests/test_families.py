"""Every MoE family moerun describes (models.hf.FAMILIES) through the whole engine, and the census of the
installed transformers' MoE families: each is described or listed as unsupported with its reason.

The seven original families are tested at length elsewhere (test_generate, test_hf_equivalence, ...); here
each further family is loaded from a saved checkpoint and must generate transformers' greedy tokens, and
run quantized to int8 and with its experts offloaded to the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moerun
from families import FAMILIES, MORE_FAMILIES
from moerun.models.hf import FAMILY_OF_TYPE, UNSUPPORTED_FAMILIES, moe_model_types
from moerun.runtime.generate import default_runner
from tiny_checkpoints import one_thread, save_checkpoint  # noqa: F401  (one_thread: autouse fixture)

NEW_TOKENS = 20
MIN_MARGIN = 1e-3  # as test_generate: the reference's greedy choice must not be a near tie


@pytest.fixture(scope="module", params=MORE_FAMILIES)
def checkpoint(request, tmp_path_factory) -> tuple[str, Path, list[int]]:
    """A saved tiny checkpoint of the family and transformers' greedy tokens after a fixed prompt."""
    family = request.param
    path = save_checkpoint(family, tmp_path_factory.mktemp(family))
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        out = reference.generate(
            PROMPT[None], max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > MIN_MARGIN, "near tie in the reference: choose another seed"
    return family, path, out.sequences[0, PROMPT.numel() :].tolist()


PROMPT = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(0))


def test_every_family_entry_is_tested() -> None:
    assert set(FAMILY_OF_TYPE) == set(FAMILIES) | set(MORE_FAMILIES)


def test_greedy_tokens_equal_transformers(checkpoint) -> None:
    family, path, expected = checkpoint
    loaded = moerun.load(path, dtype="fp32")
    assert loaded.config.model_type == family
    assert moerun.generate(loaded, prompt=PROMPT, max_new_tokens=NEW_TOKENS).token_ids == expected


def test_offloaded_experts_give_the_resident_tokens(checkpoint) -> None:
    _, path, expected = checkpoint
    loaded = moerun.load(path, dtype="fp32", memory_budget="50%", prefetch=False)
    assert loaded.cache is not None
    assert moerun.generate(loaded, prompt=PROMPT, max_new_tokens=NEW_TOKENS).token_ids == expected


def test_int8_experts_run_and_stay_close(checkpoint) -> None:
    _, path, _ = checkpoint
    loaded = moerun.load(path, dtype="fp32")
    want = default_runner(loaded.model).prefill(PROMPT)
    moerun.quantize(loaded.model, moerun.QuantConfig(8))
    got = default_runner(loaded.model).prefill(PROMPT)
    # int8 rounding moves the logits a little (and may flip a near tie later on), never far
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99
    assert len(moerun.generate(loaded, prompt=PROMPT, max_new_tokens=NEW_TOKENS).token_ids) == NEW_TOKENS


def test_every_installed_moe_family_is_described_or_refused_with_a_reason() -> None:
    types = moe_model_types()
    assert len(types) >= 20, types  # the census found the installed transformers' MoE families
    undecided = [t for t in types if t not in FAMILY_OF_TYPE and t not in UNSUPPORTED_FAMILIES]
    assert undecided == [], f"MoE families neither described nor listed as unsupported: {undecided}"
    assert all(reason.strip() for reason in UNSUPPORTED_FAMILIES.values())
    assert not set(UNSUPPORTED_FAMILIES) & set(FAMILY_OF_TYPE)


def test_loading_an_unsupported_family_names_the_reason(tmp_path: Path) -> None:
    model_type, reason = next(iter(UNSUPPORTED_FAMILIES.items()))
    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    with pytest.raises(moerun.CheckpointError, match=reason.split(";")[0][:40]):
        moerun.load(tmp_path)


# ---- bf16, checked at every position ----------------------------------------------------------------------
# moerun in bf16 against transformers in fp32. bf16 rounding of the weights alone moves the logits, most where
# it flips a routing decision, and transformers' own bf16 model moves them as much: so at each position the
# tolerance is max(BF16_ABS, BF16_REL x transformers' bf16 error there). BF16_ABS is an eighth of these tiny
# models' logit standard deviation (~1.2). A position where some layer's fp32 routing is a near tie (its k-th
# and (k+1)-th choice scores within ROUTE_TIE) may route differently in bf16 in moerun and in transformers
# alike, and is exempt.
BF16_ABS = 0.15
BF16_REL = 1.5
ROUTE_TIE = 0.05


def _routing_near_ties(model, ids: torch.Tensor) -> torch.Tensor:
    """[T] bool: positions where some MoE layer's choice scores (logits; sigmoid plus bias for sigmoid
    routing) of the k-th and (k+1)-th expert are within ROUTE_TIE, in ``model`` (moerun-patched)."""
    from moerun.layer import MoELayer

    margins = []

    def record(layer: MoELayer, args) -> None:
        scores = layer.router_logits(args[0].reshape(-1, layer.hidden_size)).float()
        if layer.routing.mode == "sigmoid_group_topk":
            scores = torch.sigmoid(scores) + (layer.score_bias if layer.score_bias is not None else 0.0)
        ranked = scores.sort(dim=-1, descending=True).values
        margins.append(ranked[:, layer.routing.top_k - 1] - ranked[:, layer.routing.top_k])

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, MoELayer)]
    try:
        _logits(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(margins).amin(dim=0) < ROUTE_TIE


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids[None]).logits[0].float()  # [T, V]


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_bf16_logits_and_greedy_tokens_within_tolerance_of_fp32(family: str, tmp_path: Path) -> None:
    path = save_checkpoint(family, tmp_path)
    fp32 = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        greedy = fp32.generate(PROMPT[None], max_new_tokens=NEW_TOKENS, do_sample=False)[0]  # prompt + new
    reference = _logits(fp32, greedy)
    hf_bf16 = _logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(), greedy)
    tolerance = torch.clamp(BF16_REL * (hf_bf16 - reference).abs().amax(-1), min=BF16_ABS)  # [T]

    route_ties = _routing_near_ties(moerun.load(path, dtype="fp32").model, greedy)  # [T]
    loaded = moerun.load(path, dtype="bf16")
    error = (_logits(loaded.model, greedy) - reference).abs().amax(-1)
    over = ((error > tolerance) & ~route_ties).nonzero().flatten().tolist()
    assert over == [], f"positions {over}: error {error[over].tolist()} over tolerance {tolerance[over].tolist()}"

    # Greedy tokens: equal to fp32's up to the first step whose fp32 top-2 margin is within twice the
    # tolerance or whose routing is a near tie (bf16 may choose either; after it the sequences may part).
    ids = moerun.generate(loaded, prompt=PROMPT, max_new_tokens=NEW_TOKENS).token_ids
    expected = greedy[PROMPT.numel() :].tolist()
    top2 = reference[PROMPT.numel() - 1 : -1].topk(2, dim=-1).values  # the logits each new token was chosen by
    chosen_at = slice(PROMPT.numel() - 1, -1)
    near_tie = ((top2[:, 0] - top2[:, 1]) < 2 * tolerance[chosen_at]) | route_ties[chosen_at]
    first_tie = int(near_tie.nonzero()[0]) if near_tie.any() else NEW_TOKENS
    assert ids[:first_tie] == expected[:first_tie], (ids, expected, first_tie)


def test_a_quantized_checkpoint_reloads_to_the_same_tokens(checkpoint, tmp_path: Path) -> None:
    """moerun quantize's output (low-bit experts, float recurrent mixers) loads back, resident and offloaded."""
    from moerun.models.convert import quantize_checkpoint

    _, path, _ = checkpoint
    quantize_checkpoint(path, tmp_path / "int8", moerun.QuantConfig(8), dtype="fp32")
    in_memory = moerun.load(path, dtype="fp32")
    moerun.quantize(in_memory.model, moerun.QuantConfig(8))
    expected = moerun.generate(in_memory, prompt=PROMPT, max_new_tokens=NEW_TOKENS).token_ids
    for budget in (None, "50%"):
        reloaded = moerun.load(tmp_path / "int8", dtype="fp32", memory_budget=budget, prefetch=False)
        assert moerun.generate(reloaded, prompt=PROMPT, max_new_tokens=NEW_TOKENS).token_ids == expected, budget
