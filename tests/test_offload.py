"""Expert offload: bit-exact against the resident model, the minimum budget, eviction policies, statistics,
page-cache dropping, prefetching and the CLI options."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import moerun
from families import FAMILIES
from moerun import cli
from moerun.kernels import native
from moerun.models.convert import quantize_checkpoint
from moerun.models.loader import CheckpointError, default_model_dir
from moerun.models.quantized import QuantConfig, moe_layers
from moerun.offload import offloaded, store
from moerun.offload.cache import LFUPolicy, LRUPolicy, make_policy
from moerun.runtime.lean import make_lean_runner
from tiny_checkpoints import one_thread, save_checkpoint  # noqa: F401  (one_thread: autouse fixture)

REFERENCE = default_model_dir()
IDS = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))


def logits(loaded, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(ids).logits


@pytest.fixture(scope="module")
def resident() -> dict[str, torch.Tensor]:
    return {dtype: logits(moerun.load(REFERENCE, dtype)) for dtype in ("fp32", "bf16")}


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("q") / "int4"
    quantize_checkpoint(REFERENCE, dst, QuantConfig(bits=4, group_size=32), dtype="fp32")
    return dst


def expert_bytes(dtype: str) -> int:
    """One reference-model expert (gate, up and down [512, 128]) in bytes."""
    return 3 * 512 * 128 * (4 if dtype == "fp32" else 2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(
    ("budget", "policy", "prefetch"),
    [("min", "lru", False), ("min", "lfu", True), ("30%", "lru", True), ("50%", "lfu", False), ("100%", "lfu", True)],
)
def test_offloaded_logits_equal_resident_bit_for_bit(resident, dtype, budget, policy, prefetch):
    """Down to one layer's selected experts (2 slots): prefill runs a layer's 8 experts in parts."""
    if budget == "min":
        budget = 2 * expert_bytes(dtype)
    loaded = moerun.load(REFERENCE, dtype, memory_budget=budget, cache_policy=policy, prefetch=prefetch)
    assert torch.equal(logits(loaded), resident[dtype])
    assert torch.equal(logits(loaded), resident[dtype])  # again, now with a warm cache
    loaded.cache.close()


@pytest.fixture
def native_off(monkeypatch):
    """The native kernel disabled for one test, so that it runs the torch fallback on any host."""
    monkeypatch.setenv("MOERUN_DISABLE_NATIVE", "1")
    native._library.cache_clear()
    yield
    native._library.cache_clear()  # monkeypatch restores the variable after this


def with_backend(loaded, backend: str):
    """``loaded`` with every MoE layer set to run its experts on ``backend``."""
    for layer in moe_layers(loaded.model).values():
        layer.backend = backend
    return loaded


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("forced_by", ["native off", "torch backend"])
def test_torch_parts_equal_resident_torch_bit_for_bit(request, monkeypatch, forced_by, dtype):
    """With torch running the experts (the native kernel off, or the layers' backend set to torch), prefill at
    the minimum budget (2 slots) runs each layer's selected experts in parts into one sorted buffer, combined once."""
    if forced_by == "native off":
        request.getfixturevalue("native_off")
        assert not native.is_available()
    backend = "torch" if forced_by == "torch backend" else "auto"
    parts = []
    real = offloaded.experts_torch
    monkeypatch.setattr(offloaded, "experts_torch", lambda *a, **k: parts.append(k) or real(*a, **k))
    want = logits(with_backend(moerun.load(REFERENCE, dtype), backend))
    loaded = with_backend(moerun.load(REFERENCE, dtype, memory_budget=2 * expert_bytes(dtype), prefetch=False), backend)
    assert torch.equal(logits(loaded), want)
    assert len(parts) >= 4 * 2 and all("out_sorted" in k for k in parts)  # 4 layers of 2 parts or more
    loaded.cache.close()


def test_reference_backend_in_parts_is_close_to_resident():
    """Backends without a shared-output path run each part as a plan of its own slots and sum the parts."""
    want = logits(with_backend(moerun.load(REFERENCE, "fp32"), "reference"))
    loaded = with_backend(moerun.load(REFERENCE, "fp32", memory_budget=2 * expert_bytes("fp32")), "reference")
    torch.testing.assert_close(logits(loaded), want, rtol=1e-4, atol=1e-4)
    loaded.cache.close()


def test_offloading_swaps_the_experts_container():
    """A memory budget replaces each layer's resident experts by OffloadedExperts: same activation, backend
    and biases, no expert storage left in memory, and nothing else about the layer changed."""
    resident = moe_layers(moerun.load(REFERENCE, "fp32").model)
    loaded = moerun.load(REFERENCE, "fp32", memory_budget="50%")
    for name, layer in moe_layers(loaded.model).items():
        experts, before = layer.experts, resident[name].experts
        assert isinstance(experts, offloaded.OffloadedExperts) and experts.index == list(resident).index(name)
        assert (experts.glu, experts.backend, experts.num_experts) == (before.glu, before.backend, before.num_experts)
        assert experts.gate_up.device.type == "meta" and experts.gate_up.shape == before.gate_up.shape
        torch.testing.assert_close(layer.router_weight, resident[name].router_weight)
        assert not hasattr(layer, "offload")
    loaded.cache.close()


def test_offloaded_experts_refuse_a_forward_that_records_gradients():
    loaded = moerun.load(REFERENCE, "fp32", memory_budget="50%")
    layer = next(iter(moe_layers(loaded.model).values()))
    x = torch.randn(3, layer.hidden_size)
    with pytest.raises(ValueError, match="inference only"):
        layer(x.clone().requires_grad_())
    layer.router_weight.requires_grad_(True)  # the routing weights then require grad
    with pytest.raises(ValueError, match="inference only"):
        layer(x)
    with torch.no_grad():
        assert layer(x).shape == x.shape
    loaded.cache.close()


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_offloaded_layer_takes_zero_tokens(backend):
    loaded = moerun.load(REFERENCE, "fp32", memory_budget=2 * expert_bytes("fp32"))
    layer = next(iter(moe_layers(loaded.model).values()))
    layer.backend = backend
    assert layer(torch.zeros(0, layer.hidden_size)).shape == (0, layer.hidden_size)
    assert loaded.cache.report()["layers"][0]["accesses"] == 0
    loaded.cache.close()


def test_quantized_checkpoint_offloaded_equals_resident(int4_dir):
    """Bit for bit where the native kernel runs both; on the torch path both run torch's int4 GEMM on converted
    copies (the offloaded ones per cache slot), so there they agree to float rounding."""
    want = logits(moerun.load(int4_dir, "fp32"))
    loaded = moerun.load(int4_dir, "fp32", memory_budget="25%")
    assert loaded.cache.num_slots == 8  # a quarter of 4 layers x 8 experts
    if native.is_available():
        assert torch.equal(logits(loaded), want)
    else:
        torch.testing.assert_close(logits(loaded), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_int4_slots_count_the_torch_layout_they_keep_within_the_budget(int4_dir):
    """Off the native kernel a slot's int4 experts keep torch's int4 GEMM layout beside them: a byte budget pays
    for it, and what the slots hold after a run stays within it."""
    loaded = moerun.load(int4_dir, "fp32", memory_budget=10**9)
    layout = loaded.cache.store.layouts[0][0]
    extra = offloaded.conversions_nbytes_of(layout, torch.float32)
    assert (extra == 0) == native.is_available()
    slot = loaded.cache.store.slot_nbytes() + extra
    loaded = moerun.load(int4_dir, "fp32", memory_budget=5 * slot + slot // 2)
    assert loaded.cache.num_slots == 5
    logits(loaded)
    views = next(iter(moe_layers(loaded.model).values())).experts._views  # shared by the layers
    held = sum(t.numel() * t.element_size() for _, _, matrices in views.values() for m in matrices
               if m.conversions for t in m.conversions.values())  # fmt: skip
    assert len(views) <= 5
    assert 0 < held <= 5 * extra or native.is_available()


def test_lean_runner_decodes_the_same_tokens_offloaded():
    prompt = IDS[0, :8]
    results = []
    for budget in (None, "30%"):
        loaded = moerun.load(REFERENCE, "fp32", memory_budget=budget)
        runner = make_lean_runner(loaded.model)
        out = [runner.prefill(prompt)]
        for _ in range(6):
            out.append(runner.decode(int(out[-1].argmax())))
        results.append(torch.stack(out))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])
def test_every_family_offloads_exactly(family, tmp_path):
    path = save_checkpoint(family, tmp_path / family)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    want = logits(moerun.load(path, "fp32"), ids)
    loaded = moerun.load(path, "fp32", memory_budget="40%")
    assert torch.equal(logits(loaded, ids), want)


def test_gpt_oss_float_checkpoint_is_refused(tmp_path):
    path = save_checkpoint("gpt_oss", tmp_path / "gpt_oss")
    with pytest.raises(CheckpointError, match="moerun quantize"):
        moerun.load(path, "fp32", memory_budget="50%")


def test_budget_below_one_layers_experts_is_refused_naming_the_minimum():
    minimum = 2 * expert_bytes("fp32")
    with pytest.raises(CheckpointError, match=r"at least 1\.5 MiB \(2 experts of 768\.0 KiB\)"):
        moerun.load(REFERENCE, "fp32", memory_budget=minimum - 1)
    assert moerun.load(REFERENCE, "fp32", memory_budget=minimum).cache.num_slots == 2
    with pytest.raises(CheckpointError, match="cannot read"):
        moerun.load(REFERENCE, "fp32", memory_budget="lots")


def test_budget_beyond_all_experts_holds_each_once():
    loaded = moerun.load(REFERENCE, "bf16", memory_budget="10GB")
    assert loaded.cache.num_slots == 32


def test_statistics_add_up():
    loaded = moerun.load(REFERENCE, "fp32", memory_budget="50%", cache_policy="lru", prefetch=False)
    logits(loaded)
    logits(loaded)
    report = loaded.cache.report()
    layers = report["layers"]
    # each pass needs each layer's distinct selected experts once; the second finds half the model resident
    assert all(layer["accesses"] % 2 == 0 and 2 <= layer["accesses"] <= 16 for layer in layers)
    misses = sum(layer["accesses"] - layer["hits"] for layer in layers)
    assert report["bytes_read"] == misses * loaded.cache.store.file_nbytes(0, 0)  # bf16 in the file
    assert loaded.cache.store.stats.reads == misses
    assert all(layer["prefetch_hits"] == layer["prefetched"] == layer["predicted"] == 0 for layer in layers)
    assert report["stall_s"] > 0 and report["storage_gbps"] > 0


def test_prefetch_predicts_the_next_layer_and_is_scored(monkeypatch):
    # Whether prefetching pays depends on measured timings (prefetch_pays, tested below); here it always runs.
    monkeypatch.setattr(offloaded, "prefetch_pays", lambda *measured: True)
    loaded = moerun.load(REFERENCE, "fp32", memory_budget="50%", prefetch=True)
    runner = make_lean_runner(loaded.model)
    token = runner.prefill(IDS[0, :4]).argmax()
    for _ in range(8):
        token = runner.decode(int(token)).argmax()
    loaded.cache.wait()
    report = loaded.cache.report()
    assert report["layers"][0]["predicted"] == 0  # nothing predicts the first layer
    assert all(layer["predicted"] >= 16 for layer in report["layers"][1:])  # 2 per decoded token
    assert 0.0 < report["prediction_accuracy"] <= 1.0
    for layer in report["layers"][1:]:
        # only predictions for uncached experts are read, and each such read is scored
        assert layer["predicted_uncached"] <= layer["predicted"]
        assert layer["prefetch_hits"] <= layer["prefetched"] <= layer["predicted_uncached"]
        assert layer["predicted_uncached_used"] <= layer["predicted_uncached"]
    assert sum(layer["prefetch_hits"] for layer in report["layers"]) > 0


@pytest.mark.parametrize(("accuracy", "lead_s", "read_s", "busy", "pays"), [
    (0.6, 1.0, 1.0, 1.0, True),  # a right read hidden whole, more often right than wrong
    (0.5, 1.0, 1.0, 1.0, False),  # as often wrong (a whole read added) as right
    (0.39, 5.0, 1.0, 1.0, False),  # a long lead does not help predictions that are mostly wrong
    (0.39, 5.0, 1.0, 0.5, True),  # ... unless storage is idle half the time, where a wrong read costs half
    (0.75, 0.2, 1.0, 1.0, False),  # right 3 times in 4, but each hides only a fifth of its read
    (0.9, 0.2, 1.0, 1.0, True),
    (0.05, 1.0, 1.0, 0.1, False),  # nearly always wrong: not worth it even with storage mostly idle
])  # fmt: skip
def test_prefetch_pays_when_hidden_reads_outweigh_wrong_ones(accuracy, lead_s, read_s, busy, pays):
    assert offloaded.prefetch_pays(accuracy, lead_s, read_s, busy) is pays


def test_prefetch_pays_only_while_it_hides_more_than_its_cpu_time():
    # the reference model on 2 busy cores: 70% right, a 0.5 ms read, 0.3 ms lead, storage busy a third of the time
    assert offloaded.prefetch_pays(0.7, 0.3e-3, 0.5e-3, 0.3, cpu_s=0.1e-3)
    assert not offloaded.prefetch_pays(0.7, 0.3e-3, 0.5e-3, 0.3, cpu_s=0.2e-3)


def _record_fadvise(monkeypatch) -> list[tuple[int, int, int]]:
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length, advice)))
    return calls


def test_reads_use_direct_io_in_chunks_and_stay_exact(monkeypatch, resident):
    """Chunks much smaller than an expert's matrices (256 KiB) exercise reads that straddle chunk boundaries."""
    monkeypatch.setattr(store, "_DIRECT_CHUNK", 3 * store._DIRECT_BLOCK)
    fadvised = _record_fadvise(monkeypatch)
    loaded = moerun.load(REFERENCE, "fp32", memory_budget="50%", prefetch=False)
    assert torch.equal(logits(loaded), resident["fp32"])
    assert all(fd is not None for fd in loaded.cache.store._direct_fds.values()) and not fadvised


def test_without_direct_io_reads_drop_their_pages_from_the_page_cache(monkeypatch, resident):
    real_open = os.open

    def open_without_direct_io(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")  # as tmpfs answers
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_without_direct_io)
    calls = _record_fadvise(monkeypatch)
    loaded = moerun.load(REFERENCE, "fp32", memory_budget="50%", prefetch=False)
    assert torch.equal(logits(loaded), resident["fp32"])
    assert calls and all(advice == os.POSIX_FADV_DONTNEED for _, _, advice in calls)
    assert sum(length for _, length, _ in calls) == loaded.cache.report()["bytes_read"]


def test_an_experts_neighbouring_pieces_are_read_as_one_span():
    def piece(file, offset, nbytes, dtype=torch.bfloat16):
        return store.Piece(Path(file), offset, 0, 0, nbytes // 2, torch.bfloat16, dtype, 0)

    pieces = [
        piece("a", 0, 100), piece("a", 100, 100), piece("a", 210, 100),  # adjacent, then a 10-byte gap: one span
        piece("a", 1000, 100),  # too far
        piece("a", 1100, 100, torch.float32),  # converted through a buffer: alone
        piece("b", 1200, 100),  # another file
        piece("b", 1300, 902),  # would make the span longer than 1000 bytes
    ]  # fmt: skip
    spans = store.merge_pieces(pieces, max_gap=64, max_span=1000)
    assert [(s.file.name, s.offset, s.nbytes, len(s.pieces)) for s in spans] == [
        ("a", 0, 310, 3), ("a", 1000, 100, 1), ("a", 1100, 100, 1), ("b", 1200, 100, 1), ("b", 1300, 902, 1),
    ]  # fmt: skip
    loaded = moerun.load(REFERENCE, "bf16", memory_budget="50%")
    assert all(len(spans) == 1 for layer in loaded.cache.store.spans for spans in layer)  # gate, up, down together


def test_a_slot_too_small_for_the_expert_is_refused():
    loaded = moerun.load(REFERENCE, "fp32", memory_budget="50%", prefetch=False)
    with pytest.raises(ValueError, match="contiguous bytes"):
        loaded.cache.store.read(0, 0, torch.empty(loaded.cache.slot_nbytes - 1, dtype=torch.uint8))


def test_a_truncated_checkpoint_is_an_error_naming_the_expert(tmp_path):
    path = tmp_path / "reference"
    shutil.copytree(REFERENCE, path)
    loaded = moerun.load(path, "fp32", memory_budget="50%", prefetch=False)
    pieces = loaded.cache.store.pieces
    last, li, e = max(
        (p.offset + p.nbytes, li, e) for li, layer in enumerate(pieces) for e, ps in enumerate(layer) for p in ps
    )
    os.truncate(pieces[li][e][0].file, last - 1)
    with pytest.raises(OSError, match=f"truncated: expert {e} of MoE layer {li}"):
        loaded.cache.store.read(li, e, torch.empty(loaded.cache.slot_nbytes, dtype=torch.uint8))


def test_lru_evicts_the_least_recent_and_never_used_first():
    policy = LRUPolicy()
    for key in [(0, 1), (0, 2), (0, 1)]:
        policy.access(key)
    resident = {(0, 1), (0, 2), (1, 5)}
    assert policy.victim(resident, exclude=set()) == (1, 5)  # prefetched, never used
    assert policy.victim({(0, 1), (0, 2)}, exclude=set()) == (0, 2)
    assert policy.victim({(0, 1), (0, 2)}, exclude={(0, 2)}) == (0, 1)
    assert policy.victim({(0, 1)}, exclude={(0, 1)}) is None


def test_lfu_evicts_the_least_frequent_and_forgets_slowly():
    policy = LFUPolicy(half_life=4)
    for key in [(0, 1), (0, 1), (0, 1), (0, 2)]:  # the 4th access halves the counts: (0, 1) 1.5, (0, 2) 1
        policy.access(key)
    assert policy.victim({(0, 1), (0, 2)}, exclude=set()) == (0, 2)
    policy.access((0, 2))
    policy.access((0, 2))
    assert policy.victim({(0, 1), (0, 2)}, exclude=set()) == (0, 1)
    favoring = LFUPolicy(half_life=100, favored=frozenset({0}))
    for key in [(0, 1), (2, 3), (2, 3)]:  # layer 0's single use counts twice: a tie, broken by recency
        favoring.access(key)
    assert favoring.victim({(0, 1), (2, 3)}, exclude=set()) == (0, 1)
    favoring.access((0, 1))
    assert favoring.victim({(0, 1), (2, 3)}, exclude=set()) == (2, 3)
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_policy("fifo")


def test_cli_generate_and_eval_report_the_cache(tmp_path, capsys):
    assert cli.main(["generate", "--prompt", "def f(x):", "--max-new-tokens", "4", "--memory-budget", "40%"]) == 0
    err = capsys.readouterr().err
    assert "routed experts stay in" in err and "hit rate" in err
    out = tmp_path / "eval.json"
    text = tmp_path / "t.py"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    args = ["eval", "--text", str(text), "--memory-budget", "50%", "--cache-policy", "lru", "--json", str(out)]
    assert cli.main(args) == 0
    report = json.loads(out.read_text())["expert_cache"]
    assert report["policy"] == "lru" and report["slots"] == 16 and len(report["layers"]) == 4


def test_cli_refuses_bad_offload_options(capsys):
    assert cli.main(["generate", "--prompt", "x", "--memory-budget", "1KB"]) == 2
    assert "at least" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "x", "--memory-budget", "50%", "--cache-policy", "fifo"]) == 2
    assert "cache-policy" in capsys.readouterr().err


def test_a_failed_read_leaves_no_expert_that_looks_resident(monkeypatch):
    loaded = moerun.load(REFERENCE, "fp32", memory_budget="50%", prefetch=False)
    cache = loaded.cache
    real_read = cache.store.read

    def failing_read(layer, expert, slot):
        if expert == 1:
            raise OSError("model.safetensors is truncated")
        return real_read(layer, expert, slot)

    monkeypatch.setattr(cache.store, "read", failing_read)
    with pytest.raises(OSError, match="truncated"):
        cache.acquire(0, [0, 1, 2])
    assert cache.resident() == {(0, 0)}  # expert 1 failed and expert 2 was never read
    assert not cache._pinned
    monkeypatch.setattr(cache.store, "read", real_read)
    slots = cache.acquire(0, [1, 2])
    assert len(slots) == 2 and cache.resident() == {(0, 0), (0, 1), (0, 2)}


def _reshape_tensor(file: Path, name: str, shape: tuple[int, ...]) -> None:
    """Store tensor ``name`` of a safetensors file with another shape of the same size (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    tensors[name] = tensors[name].reshape(shape).contiguous()
    save_file(tensors, file, metadata=metadata)


def test_a_wrong_shaped_expert_tensor_is_refused_as_when_loading_it(tmp_path, int4_dir):
    """Experts left in the file are checked like the tensors that are read: a wrong shape of the right size
    would otherwise be read as if it were right."""
    path = save_checkpoint("mixtral", tmp_path / "mixtral")
    name = "model.layers.0.block_sparse_moe.experts.3.w1.weight"  # [32, 64]
    _reshape_tensor(path / "model.safetensors", name, (64, 32))
    with pytest.raises(CheckpointError, match=rf"tensor {name} in model.safetensors has shape \[64, 32\]"):
        moerun.load(path, "fp32", memory_budget="50%")
    quantized = tmp_path / "int4"
    shutil.copytree(int4_dir, quantized)
    name = "model.layers.0.mlp.layer.down.scales"  # [8, 256, 8]
    _reshape_tensor(quantized / "model.safetensors", name, (8, 128, 16))
    with pytest.raises(CheckpointError, match=rf"tensor {name} in model.safetensors is F16 \[8, 128, 16\]"):
        moerun.load(quantized, "fp32", memory_budget="50%")


@pytest.mark.parametrize(
    ("dtype", "value", "prefetch"),
    [("fp32", float("nan"), False), ("bf16", float("nan"), True), ("bf16", torch.finfo(torch.float32).max, False)],
)
def test_nan_in_an_expert_read_from_storage_is_refused_naming_it(tmp_path, dtype, value, prefetch):
    """Experts left in the checkpoint are checked when read (a resident load refuses them at once); the
    float32 maximum is finite in fp32 but infinite once read into a bf16 slot."""
    from safetensors.torch import load_file, save_file

    path = save_checkpoint("olmoe", tmp_path / "olmoe")
    tensors = load_file(path / "model.safetensors")
    for e in range(8):  # whichever experts the tokens select
        tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight"][3, 5] = value
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="contains NaN or infinite values"):
        moerun.load(path, dtype)
    loaded = moerun.load(path, dtype, memory_budget="50%", prefetch=prefetch)
    message = r"expert \d of MoE layer 0 \(down weights, in model\.safetensors\) contains NaN or infinite values"
    with pytest.raises(CheckpointError, match=message):
        logits(loaded, torch.arange(10).unsqueeze(0))
    loaded.cache.close()


def test_the_store_refuses_a_part_filled_twice_though_the_counts_add_up(tmp_path):
    """Expert 0's gate rows filled twice and its up rows never: the element counts match."""
    path = save_checkpoint("olmoe", tmp_path / "olmoe")
    layers = list(moe_layers(moerun.load(path, "fp32").model).values())
    file = path / "model.safetensors"
    destinations = [
        (file, 0, torch.float32, matrix)
        for layer in layers
        for e in range(layer.num_experts)
        for matrix in (layer.resident.gate_up[e], layer.resident.down[e])
    ]
    store.ExpertStore(layers, destinations).close()
    gate_up = layers[0].resident.gate_up[0]  # [2I, H]
    half = gate_up.shape[0] // 2
    destinations[0:1] = [(file, 0, torch.float32, gate_up[:half]), (file, 0, torch.float32, gate_up[:half])]
    with pytest.raises(ValueError, match="the checkpoint fills some of expert 0 of MoE layer 0 twice"):
        store.ExpertStore(layers, destinations)
