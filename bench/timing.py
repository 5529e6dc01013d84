"""Shared by the bench scripts: a stand-in that times every call of the function it wraps."""

from __future__ import annotations

import time
from typing import Any


class Timed:
    """Stands in for a function and adds up the seconds spent in it."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds = inner, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
