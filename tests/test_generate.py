"""Generation: moerun's greedy decoding reproduces transformers' generate token for token, sampling is
seeded, streamed text never splits a character, and bad prompts are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moerun
from families import FAMILIES
from moerun.runtime.generate import HFRunner, default_runner, sample_next
from moerun.runtime.lean import LeanRunner
from moerun.runtime.lean_variants import VariantLeanRunner
from tiny_checkpoints import one_thread, save_checkpoint  # noqa: F401  (one_thread: autouse fixture)

NEW_TOKENS = 20
# moerun's logits match transformers' to 1e-5 x their scale (~5): a greedy step is only a fair test when its
# top two logits are further apart than that.
MIN_MARGIN = 1e-3
EOS = 256


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(family: str, tmp_path: Path) -> None:
    path = save_checkpoint(family, tmp_path)
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        out = reference.generate(
            prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values  # [steps, 2]
    assert (top2[:, 0] - top2[:, 1]).min() > MIN_MARGIN, "near tie in the reference: choose another seed"
    expected = out.sequences[0, prompt.shape[1] :].tolist()

    result = moerun.generate(moerun.load(path, dtype="fp32"), prompt=prompt[0], max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected
    assert result.stop_reason == "max_new_tokens" and result.prompt_tokens == 7


@pytest.mark.parametrize(
    ("family", "runner_type"),
    [("olmoe", LeanRunner), ("gpt_oss", VariantLeanRunner), ("deepseek_v2", VariantLeanRunner), ("glm4_moe", HFRunner)],
)
def test_default_runner_is_lean_where_covered(family: str, runner_type: type, tmp_path: Path) -> None:
    """The equivalence test above runs whichever runner this picks, so both kinds are checked."""
    assert isinstance(default_runner(moerun.load(save_checkpoint(family, tmp_path)).model), runner_type)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> moerun.LoadedModel:
    """A tiny OLMoE with the byte tokenizer (token id = byte value, EOS = 256)."""
    return moerun.load(save_checkpoint("olmoe", tmp_path_factory.mktemp("olmoe"), tokenizer=True), dtype="fp32")


class ScriptedRunner:
    """A Runner whose logits pick the tokens of a script, one per step; records what it was fed."""

    def __init__(self, script: list[int], vocab_size: int = 260, max_seq_len: int = 512) -> None:
        self.script, self.vocab_size, self.max_seq_len = script, vocab_size, max_seq_len
        self.reset()

    def reset(self) -> None:
        self.fed: list[int] = []
        self.steps = 0

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.fed.extend(input_ids.tolist())
        return self._logits()

    def decode(self, token_id: int) -> torch.Tensor:
        self.fed.append(token_id)
        return self._logits()

    def _logits(self) -> torch.Tensor:
        logits = torch.zeros(self.vocab_size)
        logits[self.script[self.steps]] = 10.0
        self.steps += 1
        return logits


def test_streamed_text_never_splits_a_character(loaded) -> None:
    text = "añb 日本 🙂!"
    script = [*text.encode(), EOS]
    runner = ScriptedRunner(script)
    tokens = list(moerun.generate_stream(loaded, prompt="hi", max_new_tokens=100, runner=runner))
    assert [t.id for t in tokens] == script  # EOS is yielded, then generation stops
    assert runner.fed == [*b"hi", *text.encode()]  # EOS is not fed back
    assert "".join(t.text for t in tokens) == text
    pieces = [t.text for t in tokens if t.text]
    assert pieces == ["a", "ñ", "b", " ", "日", "本", " ", "🙂", "!"]


def test_final_token_flushes_an_incomplete_character(loaded) -> None:
    """Generation cut off inside a character still hands out every byte decoded (as U+FFFD)."""
    runner = ScriptedRunner([*"ab日".encode()][:4])
    tokens = list(moerun.generate_stream(loaded, prompt="x", max_new_tokens=4, runner=runner))
    assert [t.text for t in tokens] == ["a", "b", "", "\ufffd"]


def test_prompt_ending_inside_a_character(loaded) -> None:
    """The output is then decoded on its own: its texts still concatenate to the decoded output."""
    script = [0xA9, *b"b", 0xC3, 0xA9]  # the rest of "é" (whose first byte ends the prompt), "b", "é"
    tokens = list(moerun.generate_stream(loaded, prompt=[*b"x", 0xC3], max_new_tokens=4, runner=ScriptedRunner(script)))
    assert "".join(t.text for t in tokens) == loaded.tokenizer.decode(script) == "\ufffdbé"


def test_hf_runner_logits_match_a_full_forward(loaded) -> None:
    ids = torch.tensor([5, 9, 200, 17, 3])
    runner = HFRunner(loaded.model)
    runner.reset()
    steps = [runner.prefill(ids[:3]), runner.decode(17), runner.decode(3)]
    with torch.inference_mode():
        full = loaded.model(ids[None]).logits[0, 2:].float()  # [3, V]
    for step, expected in zip(steps, full, strict=True):
        assert step.dtype == torch.float32 and step.shape == (260,)
        torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded(loaded) -> None:
    kwargs = dict(prompt="seeded", max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9)
    first = moerun.generate(loaded, seed=5, **kwargs).token_ids
    assert moerun.generate(loaded, seed=5, **kwargs).token_ids == first
    assert moerun.generate(loaded, seed=6, **kwargs).token_ids != first
    greedy = moerun.generate(loaded, prompt="seeded", max_new_tokens=NEW_TOKENS).token_ids
    nucleus_of_one = moerun.generate(loaded, prompt="seeded", max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1e-6)
    assert nucleus_of_one.token_ids == greedy


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])  # softmax: 0.64, 0.24, 0.09, 0.03
    generator = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, 0.5, generator) for _ in range(200)} == {0}
    assert {sample_next(logits, 1.0, 0.8, generator) for _ in range(200)} == {0, 1}
    assert {sample_next(logits, 1.0, 1.0, generator) for _ in range(400)} == {0, 1, 2, 3}
    assert sample_next(logits) == 0


def test_generation_stops_at_the_context(loaded) -> None:
    context = loaded.max_seq_len
    result = moerun.generate(loaded, prompt=[7] * (context - 3), max_new_tokens=10)
    assert len(result.token_ids) == 3 and result.stop_reason == "context"
    assert moerun.generate(loaded, prompt=[7] * context).token_ids == []
    with pytest.raises(ValueError, match=f"the prompt is {context + 1} tokens, longer than the model's context of"):
        moerun.generate_stream(loaded, prompt=[7] * (context + 1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt=""), "the prompt is empty"),
        (dict(prompt="hi", temperature=-1.0), "temperature must be >= 0"),
        (dict(prompt="hi", top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(prompt="hi", max_new_tokens=-1), "max_new_tokens must be >= 0"),
    ],
)
def test_bad_arguments(loaded, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        moerun.generate_stream(loaded, **kwargs)


def test_text_prompt_needs_a_tokenizer(loaded) -> None:
    with pytest.raises(ValueError, match="a text prompt needs a tokenizer"):
        moerun.generate(loaded.model, prompt="hi")


def test_generation_result(loaded) -> None:
    streamed = []
    result = moerun.generate(loaded, prompt="héllo", max_new_tokens=8, on_token=streamed.append)
    assert result.prompt_tokens == len("héllo".encode())
    assert [t.id for t in streamed] == result.token_ids and len(result.token_ids) == 8
    assert result.text == "".join(t.text for t in streamed)
    assert result.text == loaded.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert result.time_to_first_token_ms > 0 and result.decode_tokens_per_s > 0
    assert result.peak_memory_bytes > 0
    assert moerun.generate(loaded, prompt="héllo", max_new_tokens=0).token_ids == []
