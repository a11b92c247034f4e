"""Dynamic expert skipping: the drop rules against a per-token loop, the layer with skipping against the reference
experts on the kept pairs, calibration of beta, and off being bit for bit the unskipped layer."""

from __future__ import annotations

import pytest
import torch

from moerun import MoELayer, RoutingConfig, make_plan
from moerun.kernels import native
from moerun.kernels.experts import BACKENDS
from moerun.models.quantized import moe_layers
from moerun.quant.formats import QuantFormat
from moerun.routing import ExpertSkipping, calibrate_threshold, route, skip_experts

BACKEND_NAMES = [b for b in BACKENDS if b != "native" or native.is_available()]
ROUTINGS = {
    "softmax_topk": RoutingConfig("softmax_topk", 4, renormalize=False),
    "softmax_topk_renorm": RoutingConfig("softmax_topk", 3, renormalize=True),
    "topk_softmax": RoutingConfig("topk_softmax", 3),
    "sigmoid_group_topk": RoutingConfig("sigmoid_group_topk", 3, True, 4, 2, 2.5),
    "top1": RoutingConfig("softmax_topk", 1),
}
SKIPPINGS = [ExpertSkipping("threshold", 0.0), ExpertSkipping("threshold", 0.5), ExpertSkipping("threshold", 1.0),
             ExpertSkipping("top_p", 0.3), ExpertSkipping("top_p", 0.6), ExpertSkipping("top_p", 1.0)]  # fmt: skip


def _layer(routing: RoutingConfig, dtype: torch.dtype = torch.float32, intermediate: int = 40, **kwargs) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(
        64, intermediate, 12, routing, dtype=dtype, score_bias=routing.mode == "sigmoid_group_topk", **kwargs
    )
    layer.reset_parameters(std=0.2)
    return layer


def _naive_skip(logits, weights, ids, skipping: ExpertSkipping, routing: RoutingConfig, num_experts: int):
    """The drop rules token by token, in Python."""
    logits, weights = logits.detach(), weights.detach()
    probs = torch.softmax(logits.float(), dim=-1)
    out_w, out_ids = weights.clone(), ids.clone()
    for t in range(ids.shape[0]):
        order = sorted(range(ids.shape[1]), key=lambda j: -float(weights[t, j].detach()))
        top, mass, kept_sum = float(weights[t, order[0]]), 0.0, 0.0
        for rank, j in enumerate(order):
            if skipping.mode == "threshold":
                keep = float(weights[t, j]) >= skipping.level * top
            else:
                keep = rank == 0 or mass < skipping.level
                mass += float(probs[t, ids[t, j]])
            if not keep:
                out_w[t, j], out_ids[t, j] = 0.0, num_experts
            kept_sum += float(out_w[t, j])
        if routing.renormalize or routing.mode == "topk_softmax":
            out_w[t] *= float(weights[t].sum()) / kept_sum
    return out_w, out_ids


@pytest.mark.parametrize("skipping", SKIPPINGS, ids=lambda s: f"{s.mode}{s.level}")
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_skip_rules_match_a_per_token_loop(tokens: int, routing: str, skipping: ExpertSkipping) -> None:
    config = ROUTINGS[routing]
    layer = _layer(config)
    try:
        skipping.validate(config)
    except ValueError as e:
        assert skipping.mode == "top_p" and config.mode != "softmax_topk" and "threshold" in str(e)
        return
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
    logits = layer.router_logits(x)
    weights, ids = route(logits, config, layer.score_bias)
    got_w, got_ids = skip_experts(logits, weights, ids, skipping, config, 12)
    want_w, want_ids = _naive_skip(logits, weights, ids, skipping, config, 12)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)
    assert ((got_ids < 12).sum(dim=1) >= 1).all()  # the top expert always stays
    if skipping.level == 0.0 or (skipping.mode == "top_p" and skipping.level == 1.0):
        assert torch.equal(got_ids, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("routing", ["softmax_topk", "sigmoid_group_topk", "top1"])
@pytest.mark.parametrize("tokens", [1, 5, 300])
@torch.inference_mode()
def test_layer_with_skipping_runs_only_the_kept_pairs(tokens: int, routing: str, backend: str, dtype) -> None:
    config = ROUTINGS[routing]
    layer = _layer(config, dtype, shared_intermediate_size=24)
    skipping = ExpertSkipping("threshold", 0.6)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    logits = layer.router_logits(x)
    weights, ids = route(logits, config, layer.score_bias)
    kept_w, kept_ids = _naive_skip(logits, weights, ids, skipping, config, 12)
    layer.backend = "reference"
    expected = layer.experts(x, make_plan(kept_ids, kept_w, 12)) + layer.shared_expert(x)  # the layer's own add
    layer.backend = backend
    layer.skipping = skipping
    actual = layer(x)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    scale = float(expected.float().abs().max())  # bf16 rounds relative to the largest outputs
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance * scale)
    assert layer.skip_counts == [ids.numel(), int((kept_ids == 12).sum())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 300])
@torch.inference_mode()
def test_skipping_off_is_bit_for_bit_the_layer(tokens: int, dtype: torch.dtype) -> None:
    layer = _layer(ROUTINGS["softmax_topk"], dtype)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = layer(x)
    layer.skipping = ExpertSkipping("threshold", 0.9)
    assert not torch.equal(layer(x), before)
    layer.skipping = None
    assert torch.equal(layer(x), before)
    layer.skipping = ExpertSkipping("threshold", 0.0)  # drops nothing: the same experts, weights unchanged
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["int8", "int4-g32"])
@torch.inference_mode()
def test_skipping_with_low_bit_experts(fmt: str) -> None:
    layer = _layer(ROUTINGS["softmax_topk"], intermediate=64)  # int4 needs K a multiple of 64
    layer.resident.quantize(QuantFormat.parse(fmt))
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    logits = layer.router_logits(x)
    weights, ids = route(logits, layer.routing)
    skipping = ExpertSkipping("top_p", 0.5)
    kept_w, kept_ids = _naive_skip(logits, weights, ids, skipping, layer.routing, 12)
    layer.backend = "reference"
    expected = layer.experts(x, make_plan(kept_ids, kept_w, 12))
    layer.backend = "auto"
    layer.skipping = skipping
    torch.testing.assert_close(layer(x), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("share", [0.0, 0.1, 0.3, 0.45])
def test_calibrated_beta_drops_the_share_asked(share: float, top_k: int) -> None:
    logits = torch.randn(500, 16, generator=torch.Generator().manual_seed(top_k))
    config = RoutingConfig("softmax_topk", top_k, renormalize=False)
    weights, ids = route(logits, config)
    if share > (top_k - 1) / top_k:
        with pytest.raises(ValueError, match="at most"):
            calibrate_threshold(weights, share)
        return
    beta = calibrate_threshold(weights, share)
    assert 0.0 <= beta <= 1.0
    _, kept = skip_experts(logits, weights, ids, ExpertSkipping("threshold", beta), config, 16)
    assert int((kept == 16).sum()) == round(share * weights.numel())


@pytest.mark.parametrize(
    ("skipping", "message"),
    [(ExpertSkipping("later", 0.5), "unknown expert skipping mode"), (ExpertSkipping("threshold", 1.5), "beta"),
     (ExpertSkipping("top_p", 0.0), "p in"), (ExpertSkipping("top_p", float("nan")), "p in")],
)  # fmt: skip
def test_bad_skipping_is_refused(skipping: ExpertSkipping, message: str) -> None:
    layer = _layer(ROUTINGS["softmax_topk"])
    with pytest.raises(ValueError, match=message):
        layer.skipping = skipping
    assert layer.skipping is None


def test_top_p_is_refused_where_routing_has_no_probabilities() -> None:
    layer = _layer(ROUTINGS["sigmoid_group_topk"])
    with pytest.raises(ValueError, match="top-p routing needs softmax top-k"):
        layer.skipping = ExpertSkipping("top_p", 0.5)
    layer.skipping = ExpertSkipping("threshold", 0.5)  # threshold works on any routing


REFERENCE_IDS = torch.randint(0, 4000, (1, 40), generator=torch.Generator().manual_seed(0))


def _reference_logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(REFERENCE_IDS).logits


@pytest.mark.parametrize("share", [0.1, 0.3])
def test_calibrated_model_skips_about_the_share_asked(share: float) -> None:
    import moerun
    from moerun.models.skipping import calibrate_skipping, set_skipping, skipped_share

    loaded = moerun.load(None, "fp32")
    calibration = REFERENCE_IDS[0].tolist() * 3
    skipping = calibrate_skipping(loaded.model, calibration, share, window=40)
    assert all(layer.skipping is None for layer in moe_layers(loaded.model).values())
    assert len(skipping) == 4 and all(s.mode == "threshold" for s in skipping.values())
    before = _reference_logits(loaded)
    set_skipping(loaded.model, skipping)
    after = _reference_logits(loaded)
    assert not torch.equal(before, after)
    # calibrated in order, each layer on inputs the skipping before it changed: the share asked, on these tokens
    assert abs(skipped_share(loaded.model) - share) < 0.03
    set_skipping(loaded.model, None)
    assert torch.equal(_reference_logits(loaded), before) and skipped_share(loaded.model) is None


def test_set_skipping_refuses_a_mapping_that_does_not_fit() -> None:
    import moerun
    from moerun.models.skipping import set_skipping

    loaded = moerun.load(None, "fp32")
    with pytest.raises(ValueError, match="no setting for MoE layer"):
        set_skipping(loaded.model, {"model.layers.0.mlp.layer": ExpertSkipping("threshold", 0.5)})


def test_offloaded_experts_skip_reads_and_equal_resident_skipping() -> None:
    import moerun
    from moerun.models.skipping import set_skipping

    skipping = ExpertSkipping("top_p", 0.4)
    resident = moerun.load(None, "fp32")
    set_skipping(resident.model, skipping)
    expected = _reference_logits(resident)
    accesses = {}
    for name, setting in (("off", None), ("on", skipping)):
        offloaded = moerun.load(None, "fp32", memory_budget="25%", cache_policy="lru", prefetch=False)
        set_skipping(offloaded.model, setting)
        with torch.no_grad():
            for t in range(REFERENCE_IDS.shape[1]):  # decode-like: one token per call, no cache needed here
                offloaded.model(REFERENCE_IDS[:, t : t + 1])
            got = _reference_logits(offloaded)
        accesses[name] = sum(layer["accesses"] for layer in offloaded.cache.report()["layers"])
        if setting is not None:
            assert torch.equal(got, expected)
        offloaded.cache.close()
    assert accesses["on"] < accesses["off"]
