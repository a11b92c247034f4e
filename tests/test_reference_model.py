"""The shipped reference model loads with plain transformers, and its training split is reproducible."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, OlmoeForCausalLM

from moerun.assets import REFERENCE_HELDOUT_DIR, REFERENCE_MODEL_DIR

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_reference.py"
MAX_CHECKPOINT_BYTES = 20 * 10**6

SNIPPET = (
    "class Point:\n"
    '    """A point."""\n'
    "\n"
    "    def __init__(self, x: float, y: float = 0.0) -> None:\n"
    "        self.x, self.y = x, y  # trailing spaces  \n"
    "\tif x  >= 1 :\n"
    "\t\treturn {'a': [1, 2]} , \"é\"\n"
    "\n\n\n"
)


@pytest.fixture(scope="module")
def training() -> dict:
    return json.loads((REFERENCE_MODEL_DIR / "training.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR)


@pytest.fixture(scope="module")
def script():
    """scripts/train_reference.py as a module (importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location("train_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoint_is_complete_and_small() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json"):
        assert (REFERENCE_MODEL_DIR / name).is_file(), name
    size = sum(p.stat().st_size for p in REFERENCE_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= MAX_CHECKPOINT_BYTES, f"checkpoint is {size:,} bytes"


def test_loads_as_small_olmoe(model) -> None:
    assert isinstance(model, OlmoeForCausalLM)
    assert model.config.num_experts == 8
    assert model.config.num_experts_per_tok == 2
    assert 2e6 <= sum(p.numel() for p in model.parameters()) <= 10e6


def test_tokenizer_round_trips_python(tokenizer) -> None:
    ids = tokenizer(SNIPPET)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == SNIPPET
    assert tokenizer.decode(tokenizer.encode(SNIPPET, add_special_tokens=False)) == SNIPPET


def test_greedy_generation_decodes(model, tokenizer) -> None:
    prompt = "def fibonacci(n):"
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**enc, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert text.startswith(prompt)
    assert ids.shape[1] > enc["input_ids"].shape[1]


def test_heldout_files_were_not_trained_on(training, script) -> None:
    corpus = training["corpus"]
    heldout, train = corpus["heldout_files"], corpus["train_files"]
    shipped = sorted(p.name for p in REFERENCE_HELDOUT_DIR.glob("*.py"))
    assert shipped == sorted(script.heldout_name(f) for f in heldout)
    assert not set(heldout) & set(train)
    assert script.files_digest(train) == corpus["train_files_sha256"]
    assert corpus["train_files_count"] == len(train)
    assert (REFERENCE_HELDOUT_DIR / "README.md").is_file()


def test_heldout_perplexity_beats_unigram(training) -> None:
    assert training["heldout_perplexity"] < training["unigram_heldout_perplexity"] / 4


def test_corpus_listing_and_split_are_deterministic(script, training) -> None:
    root = script.stdlib_dir()
    files = script.list_corpus(root)
    assert files == script.list_corpus(root) == sorted(files)
    assert not any(part in script.EXCLUDED_DIRS for f in files for part in f.split("/")[:-1])
    train, heldout = script.split_heldout(files)
    assert (train, heldout) == script.split_heldout(list(reversed(files)))
    assert sorted(train + heldout) == files and not set(train) & set(heldout)
    # The training list itself depends on the Python build (distributions drop tkinter, distutils, ...).
    assert heldout == training["corpus"]["heldout_files"]


def test_split_rejects_missing_heldout_file(script) -> None:
    with pytest.raises(ValueError, match="held-out files missing"):
        script.split_heldout(["os.py"])


def test_tokenizer_training_is_deterministic(script) -> None:
    texts = [p.read_text(encoding="utf-8") for p in sorted(REFERENCE_HELDOUT_DIR.glob("*.py"))[:4]]
    first, second = (script.train_tokenizer(texts, 512).to_str() for _ in range(2))
    assert first == second
    script.check_round_trip(script.train_tokenizer(texts, 512), texts)
