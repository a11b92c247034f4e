"""kernels.finite.all_finite: NaN and infinities found in every float dtype, at any position, finite extremes
and subnormals accepted."""

import pytest
import torch

from moerun.kernels.finite import all_finite

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 7, (1 << 22) + 3])  # the last spans two chunks
def test_finds_nan_and_infinities_anywhere(dtype: torch.dtype, size: int) -> None:
    t = torch.randn(size, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(t)
    for value in (float("nan"), float("inf"), float("-inf")):
        for at in {0, size // 2, size - 1}:
            bad = t.clone()
            bad[at] = value
            assert not all_finite(bad), (value, at)


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_extremes_and_subnormals_pass(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    t = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, 0.0, -0.0], dtype=dtype)
    assert all_finite(t) == bool(torch.isfinite(t).all())


def test_non_contiguous_and_other_dtypes() -> None:
    t = torch.randn(8, 6)
    t[3, 0] = float("nan")
    assert not all_finite(t.t())
    assert all_finite(t[:, 1:].t())
    assert all_finite(torch.arange(5, dtype=torch.int32))
    assert not all_finite(torch.tensor([1.0, float("inf")], dtype=torch.complex64))
