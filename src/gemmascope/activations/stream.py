"""The activation stream: one forward per batch serves every hooked (layer, site).

Sequences are numbered 0, 1, 2, ... in corpus order and forwarded in batches aligned on multiples of
`batch_size` sequences (the last one filled up too), so a batch holds the same sequences, and so gives
the same numbers, whether a run starts from zero, resumes, or stops at another token count. The
collected positions (all but BOS/EOS/pad unless `keep_special`) form one *stream*; a cache stores
stream positions [0, tokens) in shards of `shard_tokens`.

The cache that stores the stream is laid out in the package docstring (`gemmascope.activations`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

from gemmascope.corpus import collected_mask
from gemmascope.hooks import collect
from gemmascope.models import SiteKey
from gemmascope.sae import dtype_of

T = TypeVar("T")


class Chunk(NamedTuple):
    """The collected positions of one forward batch, in stream order (`n` rows)."""

    start: int
    """Stream position of the first row."""
    acts: dict[SiteKey, Tensor]
    """(layer, site) -> [n, width] activations, on the model's device and dtype."""
    token_ids: Tensor
    """[n] int32 token at each row."""
    sequence: Tensor
    """[n] int64 global index of each row's sequence."""
    position: Tensor
    """[n] int32 position of each row in its sequence."""
    sequences: dict[int, np.ndarray]
    """Global sequence index -> its [context_size] tokens, for the sequences with rows here."""


def site_dir(key: SiteKey) -> str:
    """Folder of one (layer, site) inside a cache, e.g. `L03.resid_post`."""
    return f"L{key[0]:02d}.{key[1]}"


def activation_stream(
    model: torch.nn.Module,
    sequences: Iterable[np.ndarray],
    keys: Sequence[SiteKey],
    *,
    batch_size: int = 8,
    skip_ids: Iterable[int] = (),
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Chunk]:
    """Forward `sequences` in aligned batches and yield the activations of stream positions [start, stop).

    Batches whose positions all lie before `start` are skipped without a forward (only their
    tokens are counted), so resuming costs tokenisation, not compute. The last batch is filled up to
    `batch_size` sequences too, so a sequence's activations never depend on where a run stops.

    Args:
        model: the language model (hooked through `gemmascope.hooks.collect`).
        sequences: packed token sequences, as `corpus.pack_sequences` yields them.
        keys: the (layer, site) pairs to collect; one forward serves them all.
        batch_size: sequences per forward.
        skip_ids: token ids whose positions are not collected (BOS/EOS/pad by Gemma Scope's rule).
        start: first stream position to yield.
        stop: stream position to end before (None: until the sequences run out).

    Returns:
        An iterator of `Chunk`s, one per forward, covering the stream without gaps or overlaps.
    """
    skip = list(skip_ids)
    group: list[tuple[int, np.ndarray, np.ndarray, int]] = []  # (index, tokens, mask, stream start)
    pos = 0
    for index, seq in enumerate(sequences):
        mask = collected_mask(seq, skip)
        group.append((index, seq, mask, pos))
        pos += int(mask.sum())
        if len(group) == batch_size:
            if pos > start:
                yield _forward(model, group, keys, start, stop)
            group = []
            if stop is not None and pos >= stop:
                return
    if group and pos > start:
        yield _forward(model, group, keys, start, stop)


def _forward(
    model: torch.nn.Module,
    group: list[tuple[int, np.ndarray, np.ndarray, int]],
    keys: Sequence[SiteKey],
    start: int,
    stop: int | None,
) -> Chunk:

    device = next(model.parameters()).device
    tokens = torch.from_numpy(np.stack([g[1] for g in group]))  # (B, T) int32
    mask = torch.from_numpy(np.stack([g[2] for g in group]))  # (B, T) bool
    first = torch.tensor([g[3] for g in group])[:, None]  # (B, 1)
    index = first + mask.cumsum(1) - 1  # (B, T) stream position of each collected token
    keep = mask & (index >= start) & (index < (stop if stop is not None else index.max() + 1))
    acts = collect(model, tokens.long().to(device), list(keys))  # key -> (B, T, W)
    keep_dev = keep.to(device)
    rows = {key: a[keep_dev] for key, a in acts.items()}  # key -> (n, W), row-major = stream order
    seq_ids = torch.tensor([g[0] for g in group])[:, None].expand_as(keep)  # (B, T)
    positions = torch.arange(tokens.shape[1], dtype=torch.int32).expand_as(keep)  # (B, T)
    kept_rows = keep.any(1).tolist()
    return Chunk(
        start=int(index[keep].min()) if keep.any() else start,
        acts=rows,
        token_ids=tokens[keep],
        sequence=seq_ids[keep].long(),
        position=positions[keep],
        sequences={g[0]: g[1] for g, k in zip(group, kept_rows, strict=True) if k},
    )


def model_autocast(model: Any, dtype: str) -> contextlib.AbstractContextManager:
    """On a CUDA GPU, run the model's matmuls in the (lower) storage dtype under autocast, which keeps
    norms and softmax in float32; elsewhere, and for float32 storage, run it as loaded."""
    device = next(model.parameters()).device
    if device.type == "cuda" and dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=dtype_of(dtype))
    return contextlib.nullcontext()


def prefetch(make: Callable[[], Iterator[T]], depth: int) -> Generator[T, None, None]:
    """Run the iterator `make()` in a background thread, `depth` items ahead; errors are re-raised."""
    if depth <= 0:
        yield from make()
        return
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        it = make()
        try:
            for item in it:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(("error", err))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="gemmascope-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)
