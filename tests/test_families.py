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
