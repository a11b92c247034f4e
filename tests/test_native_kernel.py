"""The native grouped GEMV against float64 torch math on the same inputs, at awkward shapes."""

from __future__ import annotations

import itertools

import pytest
import torch

from moerun.kernels import native

pytestmark = pytest.mark.skipif(not native.is_available(), reason="native kernel not built or CPU lacks AVX-512 BF16")

GROUPS = {"one": [1], "three_singles": [1, 1, 1], "mixed": [3, 1, 5], "large": [300]}


def reference(x, weight, experts, starts, counts, bias):
    out = torch.empty(x.shape[0], weight.shape[1], dtype=torch.float64)
    for e, s, c in zip(experts.tolist(), starts.tolist(), counts.tolist(), strict=True):
        out[s : s + c] = x[s : s + c].double() @ weight[e].double().T
        if bias is not None:
            out[s : s + c] += bias[e].double()
    return out


@pytest.mark.parametrize(
    ("dtype", "k", "n", "groups", "with_bias", "threads"),
    list(
        itertools.product([torch.bfloat16, torch.float32], [32, 100, 1000], [1, 7, 130], GROUPS, [False, True], [1, 2])
    ),
)
def test_grouped_gemv_matches_float64(dtype, k, n, groups, with_bias, threads) -> None:
    g = torch.Generator().manual_seed(k * n)
    counts = torch.tensor(GROUPS[groups])
    starts = torch.cumsum(counts, 0) - counts
    experts = torch.randperm(6, generator=g)[: len(counts)].sort().values
    x = torch.randn(int(counts.sum()), k, generator=g).to(dtype)
    weight = torch.randn(6, n, k, generator=g).to(dtype)
    bias = torch.randn(6, n, generator=g) if with_bias else None
    expected = reference(x, weight, experts, starts, counts, bias)
    actual = native.grouped_gemv(x, weight, experts, starts, counts, bias=bias, num_threads=threads)
    # Inputs are exact in both paths; only fp32 accumulation order differs.
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item() + 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_scatter_accumulates_weighted_rows(dtype, threads) -> None:
    g = torch.Generator().manual_seed(7)
    counts = torch.tensor([2, 3, 1])
    starts = torch.tensor([0, 2, 5])
    experts = torch.tensor([0, 2, 3])
    x = torch.randn(6, 70, generator=g).to(dtype)
    weight = torch.randn(4, 33, 70, generator=g).to(dtype)
    index = torch.tensor([0, 1, 0, 1, 2, 0])  # token 0 is routed to three experts
    scale = torch.rand(6, generator=g)
    out = torch.ones(3, 33)
    native.grouped_gemv(x, weight, experts, starts, counts, out=out, scatter_index=index, scatter_weight=scale,
                        num_threads=threads)  # fmt: skip
    rows = reference(x, weight, experts, starts, counts, None) * scale.double()[:, None]
    expected = torch.ones(3, 33, dtype=torch.float64).index_add_(0, index, rows)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)


def test_empty_groups_are_a_no_op() -> None:
    out = native.grouped_gemv(
        torch.zeros(0, 8), torch.randn(2, 4, 8), torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
    )  # fmt: skip
    assert out.shape == (0, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(x=torch.randn(2, 8, dtype=torch.float16)), "bfloat16 or float32"),
        (dict(x=torch.randn(2, 9)), "do not match"),
        (dict(weight=torch.randn(3, 8, 4).transpose(1, 2)), "must be contiguous"),
        (dict(bias=torch.randn(3, 5)), "bias must be"),
        (dict(scatter_index=torch.zeros(2, dtype=torch.long)), "scatter needs both"),
        (dict(out=torch.empty(2, 4, dtype=torch.float64)), "out must be float32"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message) -> None:
    args = dict(x=torch.randn(2, 8), weight=torch.randn(3, 4, 8))
    args.update(kwargs)
    groups = (torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    x, weight = args.pop("x"), args.pop("weight")
    with pytest.raises(ValueError, match=message):
        native.grouped_gemv(x, weight, *groups, **args)
