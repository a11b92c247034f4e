"""parse_size and format_size: units, percentages, rounding and the messages for bad input."""

from __future__ import annotations

import re

import pytest

from moerun.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("123", 123),
        ("123 B", 123),
        ("  7  ", 7),
        ("200kB", 200_000),
        ("200 KB", 200_000),
        ("3MB", 3_000_000),
        ("24GB", 24_000_000_000),
        ("2 TB", 2_000_000_000_000),
        ("1.5GB", 1_500_000_000),
        ("0.29GB", 290_000_000),  # a float product would give 289999999.99999997
        (".5kB", 500),
        ("1e9", 1_000_000_000),
        ("4KiB", 4096),
        ("512 MiB", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("2TiB", 2 * 2**40),
        ("1 PiB", 2**50),
        ("1.0001 KiB", 1024),  # 1024.1024 bytes, rounded down
    ],
)
def test_parse_size_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["1gb", "1GB", "1Gb", "1gB", "1 gb"])
def test_parse_size_decimal_unit_is_case_insensitive(text: str) -> None:
    assert parse_size(text) == 10**9


@pytest.mark.parametrize("text", ["1gib", "1GIB", "1GiB", "1 gIb"])
def test_parse_size_binary_unit_is_case_insensitive(text: str) -> None:
    assert parse_size(text) == 2**30


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [("40%", 1000, 400), ("100%", 12345, 12345), ("12.5 %", 64 * 2**30, 8 * 2**30), ("33%", 10, 3)],
)
def test_parse_size_percentage_of_total(text: str, total: int, expected: int) -> None:
    assert parse_size(text, total=total) == expected


def test_total_is_ignored_without_a_percentage() -> None:
    assert parse_size("2GB", total=10) == 2 * 10**9


def test_percentage_needs_a_total() -> None:
    with pytest.raises(ValueError, match=r"'40%'.*a percentage needs a reference size"):
        parse_size("40%")


def test_percentage_needs_a_positive_total() -> None:
    with pytest.raises(ValueError, match=r"'40%'.*must be positive, got 0"):
        parse_size("40%", total=0)


@pytest.mark.parametrize("text", ["", "   ", "GB", "abc", "1,000", "1.2.3GB", "one GB", "--5"])
def test_malformed_text_is_named(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"cannot read {text!r} as a size")):
        parse_size(text)


@pytest.mark.parametrize("text", ["5 XB", "5 gigs", "5Gbit", "5 MBs"])
def test_unknown_unit_lists_the_accepted_ones(text: str) -> None:
    with pytest.raises(ValueError, match=r"unknown unit .*accepted units: B, kB, MB, GB, TB, PB, KiB, .*TiB, PiB or %"):
        parse_size(text)


@pytest.mark.parametrize("text", ["nan", "NaN GB", "inf", "-inf", "+Infinity", "inf%"])
def test_non_finite_sizes_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"size {text!r} is not a finite number")):
        parse_size(text, total=100)


@pytest.mark.parametrize("text", ["0", "0GB", "0.0 MiB", "-5GB", "-1", "0%"])
def test_zero_and_negative_sizes_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"size {text!r} must be positive")):
        parse_size(text, total=100)


@pytest.mark.parametrize(("text", "total"), [("0.5", None), ("0.0001kB", None), ("1%", 50)])
def test_sizes_below_one_byte_are_rejected(text: str, total: int | None) -> None:
    with pytest.raises(ValueError, match=re.escape(f"size {text!r} rounds down to 0 bytes")):
        parse_size(text, total=total)


def test_absurd_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"'1e40' is implausibly large"):
        parse_size("1e40")


def test_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"must be a string.*got int 5"):
        parse_size(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("num_bytes", "expected"),
    [
        (0, "0 B"),
        (812, "812 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1_234_567, "1.18 MiB"),
        (512 * 2**20, "512.0 MiB"),
        (13 * 2**28, "3.25 GiB"),
        (2**30 - 1, "1.0 GiB"),  # 1023.999 MiB rounds up into the next unit
        (3 * 2**40, "3.0 TiB"),
        (5 * 2**50, "5.0 PiB"),
        (4096 * 2**50, "4096.0 PiB"),
    ],
)
def test_format_size(num_bytes: int, expected: str) -> None:
    assert format_size(num_bytes) == expected


def test_format_size_rejects_negative() -> None:
    with pytest.raises(ValueError, match=r"cannot be negative, got -1"):
        format_size(-1)


@pytest.mark.parametrize("num_bytes", [812, 1536, 512 * 2**20, 13 * 2**28, 3 * 2**40])
def test_format_then_parse_round_trips_exact_sizes(num_bytes: int) -> None:
    assert parse_size(format_size(num_bytes)) == num_bytes
