"""What the trainer reads: `Batches`, and the in-memory kind tests and benches use."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from gemmascope.models import SiteKey

Batches = Callable[[int], Iterator[dict[SiteKey, Tensor]]]
"""`batches(start)` yields `{(layer, site): [batch_size, width]}` from batch index `start` on."""


def tensor_batches(
    data: dict[SiteKey, Tensor], batch_size: int, *, seed: int = 0, epochs: int | None = None
) -> Batches:
    """`Batches` over activations held in memory, reshuffled each epoch (tests, small runs, benches)."""
    n = next(iter(data.values())).shape[0]
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"only {n} activation vectors, fewer than one batch of {batch_size}")

    def batches(start: int) -> Iterator[dict[SiteKey, Tensor]]:
        for i in itertools.count(start):
            epoch, j = divmod(i, per_epoch)
            if epochs is not None and epoch >= epochs:
                return
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
            idx = perm[j * batch_size : (j + 1) * batch_size]
            yield {k: v[idx] for k, v in data.items()}

    return batches
