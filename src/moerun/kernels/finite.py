"""Whether a float tensor holds NaN or infinity, at close to read bandwidth on one thread.

``torch.isfinite(t).all()`` writes a bool per element and runs on every core; checking every weight of a model
as it loads, or every expert read from storage on the prefetch thread (where a second OpenMP team would spin
on the cores the computation runs on), wants neither. A float is NaN or infinite exactly when all its exponent
bits are set, so the check is an AND and a compare over the bits, in numpy, in bounded chunks.
"""

from __future__ import annotations

import numpy as np
import torch

# dtype -> (integer view of the same width, exponent mask)
_EXPONENT_BITS = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}
_CHUNK = 1 << 22  # elements per pass: a few MiB of temporaries, in cache-friendly pieces


def all_finite(t: torch.Tensor) -> bool:
    """Whether the CPU float tensor ``t`` (any shape; bf16, fp16, fp32 or fp64) holds no NaN or infinity.
    Non-contiguous tensors are copied first; other dtypes fall back to ``torch.isfinite``."""
    if t.dtype not in _EXPONENT_BITS or t.device.type != "cpu":
        return bool(torch.isfinite(t).all())
    int_dtype, mask = _EXPONENT_BITS[t.dtype]
    bits = t.detach().contiguous().view(-1).view(int_dtype).numpy()
    mask = bits.dtype.type(mask)
    for start in range(0, bits.size, _CHUNK):
        chunk = bits[start : start + _CHUNK]
        if np.any((chunk & mask) == mask):
            return False
    return True
