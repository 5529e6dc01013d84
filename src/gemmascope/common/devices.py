"""Which torch device a run uses: one check and one resolver for every command."""

from __future__ import annotations

import os
import re

import torch

DEVICE_HELP = "`cpu`, `cuda`, `cuda:N`, `mps` or `auto` (this rank's GPU if there is one, else cpu)"


def check_device(name: str) -> None:
    """Raise `ValueError` unless `name` is a device we know how to pick (cheap: nothing is loaded)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(name)):
        raise ValueError(f"unknown device {name!r}; use {DEVICE_HELP}")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device for `name`; `auto` and bare `cuda` take this rank's GPU (LOCAL_RANK).

    Raises `ValueError` for a device this machine does not have, before anything slow is loaded.
    """
    name = str(name)
    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu" and torch.backends.mps.is_available() and _world_size() == 1:
            name = "mps"
    if name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r}: torch {torch.__version__} sees no CUDA GPU; use --device cpu or auto"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps': not available on this machine; use --device cpu or auto")
    return torch.device(name)


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
