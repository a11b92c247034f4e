"""Data shipped inside the package.

``REFERENCE_MODEL_DIR`` is a small trained OLMoE checkpoint (4 layers, 8 experts, top-2, ~8 M parameters)
with its tokenizer, loadable with plain ``transformers.AutoModelForCausalLM.from_pretrained``; it is trained on
the Python standard library by ``scripts/train_reference.py``, whose metadata is in ``training.json`` there.
``REFERENCE_HELDOUT_DIR`` holds stdlib source files that were kept out of its training, for perplexity checks.
"""

from pathlib import Path

REFERENCE_MODEL_DIR: Path = Path(__file__).resolve().parent / "reference_model"
REFERENCE_HELDOUT_DIR: Path = REFERENCE_MODEL_DIR / "heldout"

__all__ = ["REFERENCE_HELDOUT_DIR", "REFERENCE_MODEL_DIR"]
