"""One progress bar for every long step: count, rate and ETA on stderr, off under a test or rank > 0."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 unit_scale: bool = False) -> Any:  # fmt: skip
    """A tqdm bar on stderr; `enabled=False` gives one that draws nothing but still counts."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)  # fmt: skip
