"""Counts, widths and byte sizes written as people write them: `250k`, `16k`, `50G`.

One rule, everywhere: **token counts are decimal, widths and bytes binary.** `--tokens 16k` is
16,000 tokens and `1.5M` 1,500,000, as corpora are counted; `--widths 16k` is 16,384 latents and
`1m` 2^20, as Gemma Scope names its widths; `--disk-budget 50G` is 50 GiB, as disks are sized.
"""

from __future__ import annotations

import re
from typing import Annotated

_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "b": 3, "t": 4}


def _parse(
    text: str | int, base: int, what: str, example: str, suffixes: str, tail: str = ""
) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(
        rf"\s*(\d[\d_]*(?:\.\d+)?)\s*([{suffixes}]?){tail}\s*", str(text), re.IGNORECASE
    )
    if m is None:
        raise ValueError(f"cannot read the {what} {text!r}; write e.g. {example}")
    return int(round(float(m.group(1).replace("_", "")) * base ** _POWER[m.group(2).lower()]))


def parse_count(text: str | int) -> int:
    """A token count: `4096`, `250k` (250,000), `5M`, `1.5B` (decimal)."""
    return _parse(text, 1000, "count", "4096, 250k, 5M or 1.5B", "kmbg")


def parse_width(text: str | int) -> int:
    """An SAE width: `4096`, `16k` (16,384), `1m` (2^20) (binary, Gemma Scope's naming)."""
    return _parse(text, 1024, "width", "4096, 16k or 1m", "km")


def parse_bytes(text: str | int) -> int:
    """A size in bytes: `500M`, `50G`, `2GiB`, `1.5T` (binary) or a plain byte count."""
    return _parse(text, 1024, "size", "500M, 50G or 1.5T", "kmgt", r"(?:i?b)?")


def format_count(n: int) -> str:
    """The shortest exact `parse_count` spelling: 1000000 -> `1M`, 250000 -> `250k`."""
    return _format(n, 1000, "kMB")


def format_width(n: int) -> str:
    """The shortest exact `parse_width` spelling: 16384 -> `16k`, 2**20 -> `1m`."""
    return _format(n, 1024, "km")


def _format(n: int, base: int, suffixes: str) -> str:
    for power in range(len(suffixes), 0, -1):
        if n and n % base**power == 0:
            return f"{n // base**power}{suffixes[power - 1]}"
    return str(n)


class Unit:
    """Marks a config field whose flag is read with `parse` and shown with `show` (see `Count`)."""

    def __init__(self, parse, show, metavar: str) -> None:  # noqa: ANN001 - plain callables
        self.parse, self.show, self.metavar = parse, show, metavar


Count = Annotated[int, Unit(parse_count, format_count, "N")]
"""A token count field: its flag takes `250k`, `5M`."""
Width = Annotated[int, Unit(parse_width, format_width, "W")]
"""A width field: its flag takes `16k`, `1m`."""
Bytes = Annotated[int, Unit(parse_bytes, str, "SIZE")]
"""A byte-size field: its flag takes `500M`, `50G`."""
