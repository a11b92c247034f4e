"""Human-readable memory sizes: parse what a user types ("24GB", "1.5 GiB", "40%") and print byte counts back.

Memory budgets (for offloading, for mixed-precision allocation) come from the command line, so they are parsed
here in one place with messages that name the offending text. Decimal units (kB ... PB) are powers of 1000,
binary units (KiB ... PiB) powers of 1024, as in the SI/IEC convention; units are case-insensitive, so
"gb" is gigabytes, never gigabits. Arithmetic goes through ``Decimal`` so "0.29GB" is exactly 290000000 bytes
rather than whatever a float product rounds down to.
"""

from __future__ import annotations

import re
from decimal import ROUND_FLOOR, Decimal

from .errors import MemoryBudgetError

# Keys are lower-case; parsing lower-cases the unit first.
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}
_ACCEPTED = "B, kB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB or %"
# A number, then an optional unit. The sign is accepted here so that a negative size gets its own message, and
# nan/inf so that they are reported as non-finite rather than as malformed.
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?|[+-]?(?:nan|inf(?:inity)?)(?![a-z])"
_SIZE = re.compile(rf"(?P<number>{_NUMBER})\s*(?P<unit>[a-z%]*)", re.IGNORECASE)
# Far beyond any memory; stops "1e999999" from building a million-digit integer.
_MAX_DIGITS = 30
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text: str, total: int | None = None) -> int:
    """Bytes from a human size.

    Args:
        text: a positive size: plain bytes ("123", "123 B"), decimal units ("1.5GB", "200 kB"), binary units
            ("24 GiB", "512mib") or a percentage of ``total`` ("40%"). Fractions are allowed, the unit is
            case-insensitive and may follow a space.
        total: the reference size in bytes that a percentage is a share of; required only for percentages.

    Returns:
        The size in bytes, rounded down; always at least 1.

    Raises:
        ValueError: empty or malformed text, an unknown unit, a non-finite, zero or negative size, a size that
            rounds down to 0 bytes, or a percentage without a positive ``total``.
    """
    if not isinstance(text, str):
        raise TypeError(f"a size must be a string such as '24GB', got {type(text).__name__} {text!r}")
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"cannot read {text!r} as a size: expected a number and a unit such as '24GB' or '40%'")
    number = Decimal(match["number"])
    if not number.is_finite():
        raise ValueError(f"size {text!r} is not a finite number")
    if number <= 0:
        raise ValueError(f"size {text!r} must be positive")
    if number.adjusted() >= _MAX_DIGITS:
        raise ValueError(f"size {text!r} is implausibly large")

    unit = match["unit"].lower()
    if unit == "%":
        if total is None:
            raise ValueError(f"size {text!r}: a percentage needs a reference size (total) to be a share of")
        if total <= 0:
            raise ValueError(f"size {text!r}: the reference size for a percentage must be positive, got {total}")
        scaled = number * total / 100
    elif unit in _UNITS:
        scaled = number * _UNITS[unit]
    else:
        raise ValueError(f"size {text!r} has an unknown unit {match['unit']!r}; accepted units: {_ACCEPTED}")

    num_bytes = int(scaled.to_integral_value(rounding=ROUND_FLOOR))
    if num_bytes <= 0:
        raise ValueError(f"size {text!r} rounds down to 0 bytes")
    return num_bytes


def budget_bytes(memory_budget: str | int, total: int) -> int:
    """A memory budget in bytes: an int as it is, a size as ``parse_size`` reads it (percentages of ``total``).

    Raises:
        MemoryBudgetError: a size ``parse_size`` refuses.
    """
    if isinstance(memory_budget, int):
        return memory_budget
    try:
        return parse_size(memory_budget, total)
    except ValueError as e:
        raise MemoryBudgetError(str(e)) from None


def format_size(num_bytes: int) -> str:
    """A short human form of a byte count in binary units: "812 B", "512.0 MiB", "3.25 GiB".

    Args:
        num_bytes: a non-negative byte count.

    Returns:
        Bytes below 1 KiB as a whole number; larger sizes in the largest binary unit that keeps the value at or
        above 1, with at most two decimals (at least one).
    """
    if num_bytes < 0:
        raise ValueError(f"a byte count cannot be negative, got {num_bytes}")
    if num_bytes < 1024:
        return f"{int(num_bytes)} B"
    value, unit = float(num_bytes), 0
    # Compare the rounded value so 1023.999 MiB prints as "1.0 GiB", not "1024.0 MiB".
    while unit + 1 < len(_BINARY_UNITS) and round(value, 2) >= 1024:
        value /= 1024
        unit += 1
    digits = f"{value:.2f}".rstrip("0")
    if digits.endswith("."):
        digits += "0"
    return f"{digits} {_BINARY_UNITS[unit]}"
