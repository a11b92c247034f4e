"""Whole transformers models run through moerun give transformers' logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moerun
from families import FAMILIES, tiny_model
from moerun.models.hf import PatchedMoEBlock

REL_TOL = 1e-5


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= REL_TOL * scale, f"max logit error {err:.3g} exceeds {REL_TOL:g} x scale {scale:.3g}"


@pytest.fixture(scope="module", params=FAMILIES)
def saved_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param).save_pretrained(path)
    return path


def test_experts_implementation_moerun(saved_model, monkeypatch) -> None:
    calls = []
    real = moerun.models.hf.experts_forward
    monkeypatch.setattr(moerun.models.hf, "experts_forward", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(1))
    reference = AutoModelForCausalLM.from_pretrained(saved_model, experts_implementation="eager")
    through_moerun = AutoModelForCausalLM.from_pretrained(saved_model, experts_implementation="moerun")
    assert through_moerun.config._experts_implementation == "moerun"
    assert_close_to_scale(logits(through_moerun, ids), logits(reference, ids))
    assert len(calls) == through_moerun.config.num_hidden_layers


def test_patch(saved_model) -> None:
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(2))
    model = AutoModelForCausalLM.from_pretrained(saved_model, experts_implementation="eager")
    expected = logits(model, ids)
    assert moerun.patch(model) == model.config.num_hidden_layers
    assert sum(isinstance(m, PatchedMoEBlock) for m in model.modules()) == model.config.num_hidden_layers
    assert_close_to_scale(logits(model, ids), expected)


def test_patch_rejects_dense_model() -> None:
    with pytest.raises(ValueError, match="no supported MoE block"):
        moerun.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))
