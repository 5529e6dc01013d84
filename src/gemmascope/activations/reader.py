"""Shuffled activation batches for training, from a disk cache or straight from the model.

The batch protocol (`ActivationSource`), shared by both sources so the trainer does not care which:

- `source.keys`: the (layer, site) pairs served, `source.widths[key]` their widths and
  `source.batch_size` the rows per batch.
- `source.batches(start=0)` yields `dict[(layer, site), Tensor [batch_size, width]]`: row i of every
  tensor of a batch is the same token, so one read feeds SAEs at several sites.
- Batch i is a pure function of (data, seed, i): `batches(start=i)` yields exactly what the i-th and
  later batches of `batches()` are, without reading or computing what comes before (the trainer
  resumes from a checkpoint at step i this way).
- Shuffling is bucketed, as Gemma Scope did: a buffer of `buffer_size` vectors is filled and permuted,
  then emptied in batches; a batch may straddle two buffers.

`CachedActivations` reads a cache as an endless stream of epochs. Each epoch permutes the cache's
chunks of `chunk_size` consecutive vectors, fills buffers from consecutive runs of the permuted
chunks and permutes each buffer, so every vector appears exactly once per epoch, in an order fixed by
(seed, epoch). Buffers are read from memory-mapped shards by a background thread while the previous
one is consumed (memory: about 3 buffers). With `epochs=n` it stops after n epochs, the last batch
then possibly short.

`ModelActivations` runs the model over the corpus (one forward for all its keys) and fills buffers
from that single pass, in the same background thread; it stops when the corpus runs out.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from gemmascope.activations.files import check_file, read_manifest, shard_name
from gemmascope.activations.stream import activation_stream, prefetch, site_dir
from gemmascope.corpus import (
    EVAL_FRACTION,
    CorpusSplit,
    iter_documents,
    pack_sequences,
    special_ids,
)
from gemmascope.models import SiteKey

Batch = dict[SiteKey, Tensor]


class ActivationSource(Protocol):
    """What the trainer reads activations from (see the module docstring)."""

    keys: tuple[SiteKey, ...]
    widths: dict[SiteKey, int]
    batch_size: int

    def batches(self, start: int = 0) -> Iterator[Batch]: ...


def permutation(seed: int, *stream: int, n: int) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, *stream) on every machine (numpy PCG64)."""
    return np.random.Generator(np.random.PCG64([seed, *stream])).permutation(n)


BUFFER_BYTES = 1 << 30
"""The most one shuffle buffer of `CachedActivations` holds by default, in float32."""


class CachedActivations:
    """Shuffled batches of one or more (layer, site) pairs from a cache written by `gemmascope cache`.

    Args:
        path: the cache folder.
        keys: the (layer, site) pairs to read; a single pair may be given bare.
        batch_size: rows per batch.
        buffer_size: vectors shuffled together (rounded to whole chunks); Gemma Scope used ~10**6.
            None: 2^19, or fewer when the keys are many, so a buffer holds at most 1 GiB of float32
            (about three are in memory at once: 36 sites at d 640 would otherwise need 18 GiB).
        chunk_size: consecutive vectors read as a unit; smaller mixes better, reads more often.
            None: 4096, or less when a buffer would hold fewer than 64 chunks, so that each batch
            still draws from at least 64 places in the corpus.
        seed: fixes every epoch's order.
        epochs: stop after this many epochs (None: never).
        dtype: dtype of the batches (float32 by default, whatever the cache stores).
        device: where batches go.
        model: if given, the model name (or the folder it was loaded from) the cache must come from.
        verify: check each shard file's sha256 on open, not only its size: flipped bytes are
            caught before they train (it reads the shards once; `bench/verify.py` prints the cost).
        partial: read an unfinished cache (a run that was stopped) instead of refusing it.
        prefetch: buffers loaded ahead by the background thread (0: no thread).
    """

    def __init__(
        self,
        path: str | Path,
        keys: Sequence[SiteKey] | SiteKey,
        *,
        batch_size: int = 4096,
        buffer_size: int | None = None,
        chunk_size: int | None = None,
        seed: int = 0,
        epochs: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        model: str | None = None,
        verify: bool = True,
        partial: bool = False,
        prefetch: int = 1,
    ) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        keys = [keys] if isinstance(keys, tuple) and isinstance(keys[0], int) else keys
        self.keys = tuple((int(k[0]), str(k[1])) for k in keys)  # type: ignore[index]
        self.batch_size, self.seed, self.epochs = batch_size, seed, epochs
        self.dtype, self.device, self.prefetch = dtype, torch.device(device), prefetch
        self._check_model(model)
        sites = {(s["layer"], s["site"]): s for s in self.manifest["identity"]["sites"]}
        missing = [k for k in self.keys if k not in sites]
        if missing:
            raise ValueError(
                f"{self.path}: the cache has no {', '.join(f'layer {k[0]} {k[1]}' for k in missing)}; "
                f"it holds {sorted(sites)}. Cache them with `gemmascope cache --layers ... --sites ...`"
            )
        self.widths = {k: int(sites[k]["width"]) for k in self.keys}
        shards = self.manifest["shards"]
        cached, asked = sum(s["tokens"] for s in shards), self.manifest["tokens"]
        if not shards or (cached < asked and not partial):
            raise ValueError(
                f"{self.path}: the cache is incomplete ({cached:,} of {asked:,} tokens); rerun the "
                "same `gemmascope cache` command to finish it"
                + (", or pass partial=True to read what is there" if shards else "")
            )
        self.n_tokens = sum(s["tokens"] for s in shards)
        self._starts = [int(s["start"]) for s in shards]
        self._files = {k: [self._open(s, k, verify) for s in shards] for k in self.keys}
        if buffer_size is None:
            buffer_size = min(1 << 19, BUFFER_BYTES // (4 * sum(self.widths.values())))
        if chunk_size is None:
            chunk_size = 4096 if buffer_size >= 64 * 4096 else max(64, buffer_size // 64)
        self.chunk_size = min(chunk_size, self.n_tokens)
        self.n_chunks = -(-self.n_tokens // self.chunk_size)
        self.chunks_per_buffer = max(1, min(buffer_size // self.chunk_size, self.n_chunks))

    def _check_model(self, model: str | None) -> None:
        recorded = self.manifest["identity"]["model"]
        if model is not None and model not in (recorded["name"], self.manifest.get("model_path")):
            raise ValueError(
                f"{self.path / 'manifest.json'}: the cache was made from model {recorded['name']!r} "
                f"({recorded['family']}, {recorded['n_layers']} layers, d_model {recorded['d_model']}), "
                f"not {model!r}; cache activations of {model!r} or train on {recorded['name']!r}"
            )

    def _open(self, shard: dict[str, Any], key: SiteKey, verify: bool) -> Any:
        rel = f"{site_dir(key)}/{shard_name(shard['index'])}"
        path = self.path / rel
        problem = check_file(path, shard["files"][rel], sha=verify)
        if problem:
            raise ValueError(
                f"{problem}; rerun the same `gemmascope cache` command with --verify to recompute it"
            )
        try:
            handle = safe_open(str(path), framework="pt")
            shape = handle.get_slice("activations").get_shape()
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise ValueError(
                f"{path}: not a readable activation shard ({err}); rerun the cache with --verify"
            ) from err
        if shape != [shard["tokens"], self.widths[key]]:
            raise ValueError(
                f"{path}: activations are {shape[0]} x {shape[1]}, the manifest says "
                f"{shard['tokens']} x {self.widths[key]} (tokens x width); the cache is inconsistent, recreate it"
            )
        return handle

    def _read(self, key: SiteKey, lo: int, hi: int) -> Tensor:
        """Vectors [lo, hi) of the stream, across shard boundaries: (hi - lo, W) in the cache dtype."""
        parts = []
        i = bisect.bisect_right(self._starts, lo) - 1
        while lo < hi:
            start = self._starts[i]
            end = start + self.manifest["shards"][i]["tokens"]
            take = min(hi, end)
            part = self._files[key][i].get_slice("activations")[lo - start : take - start]
            where = f"{self.path / site_dir(key) / shard_name(self.manifest['shards'][i]['index'])}"
            finite_rows(part, lambda r, s=start, w=where, o=lo: f"{w}: row {o - s + r}")
            parts.append(part)
            lo, i = take, i + 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _groups(self, epoch: int) -> list[np.ndarray]:
        order = permutation(self.seed, epoch, n=self.n_chunks)
        k = self.chunks_per_buffer
        return [np.sort(order[j : j + k]) for j in range(0, self.n_chunks, k)]

    def _load(self, epoch: int, j: int, chunks: np.ndarray) -> tuple[Batch, np.ndarray]:
        c = self.chunk_size
        spans = [(int(i) * c, min((int(i) + 1) * c, self.n_tokens)) for i in chunks]
        bufs = {
            k: torch.cat([self._read(k, lo, hi) for lo, hi in spans]) for k in self.keys
        }  # (M, W)
        n = sum(hi - lo for lo, hi in spans)
        return bufs, permutation(self.seed, epoch, j + 1, n=n)

    def _buffers(self, start_row: int) -> Iterator[tuple[Batch, np.ndarray, int]]:
        epoch, offset = divmod(start_row, self.n_tokens)
        while self.epochs is None or epoch < self.epochs:
            groups = self._groups(epoch)
            sizes = [self._group_rows(g) for g in groups]
            j = bisect.bisect_right(np.cumsum(sizes).tolist(), offset)
            skip = offset - sum(sizes[:j])
            for jj in range(j, len(groups)):
                bufs, perm = self._load(epoch, jj, groups[jj])
                yield bufs, perm, skip
                skip = 0
            epoch, offset = epoch + 1, 0

    def _group_rows(self, chunks: np.ndarray) -> int:
        last = self.n_chunks - 1
        return len(chunks) * self.chunk_size - (
            (self.n_chunks * self.chunk_size - self.n_tokens) if last in chunks else 0
        )

    def memory_bytes(self) -> int:
        """What reading holds at once: the buffer being drawn from, `prefetch` ready ones and one
        being filled, each with its order (for `train.memory`)."""
        rows = self.chunks_per_buffer * self.chunk_size
        return buffers_bytes(rows, sum(self.widths.values()), self.prefetch)

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Yield batches from batch index `start` on (see the module docstring)."""
        buffers = prefetch(lambda: self._buffers(start * self.batch_size), self.prefetch)
        return _batches(buffers, self.batch_size, self.dtype, self.device)


class ModelActivations:
    """Shuffled batches computed on the fly: one forward serves every key; no disk.

    Args:
        model, tokenizer: the loaded model and its tokenizer.
        keys: (layer, site) pairs; a single pair may be given bare.
        corpus, split, text_column, eval_fraction: the text (see `corpus.iter_documents`).
        context_size: tokens per sequence, BOS included.
        batch_size: rows per batch.
        model_batch_size: sequences per forward.
        buffer_size: vectors shuffled together (memory: buffer_size x sum of widths x 4 bytes, x2).
        seed: fixes the order within each buffer.
        dtype: dtype of the batches.
        keep_special: also collect BOS/EOS/pad positions.
        prefetch: buffers computed ahead by the background thread (0: no thread).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        keys: Sequence[SiteKey] | SiteKey,
        *,
        corpus: str = "default",
        split: CorpusSplit = "train",
        text_column: str = "text",
        eval_fraction: float = EVAL_FRACTION,
        context_size: int = 1024,
        batch_size: int = 4096,
        model_batch_size: int = 8,
        buffer_size: int = 1 << 16,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        keep_special: bool = False,
        prefetch: int = 1,
    ) -> None:
        from gemmascope.models import check_forward, check_site, model_info

        keys = [keys] if isinstance(keys, tuple) and isinstance(keys[0], int) else keys
        self.keys = tuple((int(k[0]), str(k[1])) for k in keys)  # type: ignore[index]
        info = model_info(model)
        for layer, site in self.keys:
            check_site(info, layer, site)
        check_forward(model, model_batch_size, context_size)
        self.widths = {k: info.site_width(k[1]) for k in self.keys}
        self.model, self.tokenizer = model, tokenizer
        self.corpus, self.split, self.text_column = corpus, split, text_column
        self.eval_fraction, self.context_size = eval_fraction, context_size
        self.batch_size, self.model_batch_size, self.buffer_size = (
            batch_size,
            model_batch_size,
            buffer_size,
        )
        self.seed, self.dtype, self.prefetch = seed, dtype, prefetch
        self.skip = [] if keep_special else special_ids(tokenizer)

    def _buffers(self, start_row: int) -> Iterator[tuple[Batch, np.ndarray, int]]:
        fill, skip = divmod(start_row, self.buffer_size)
        docs = iter_documents(self.corpus, self.split, text_column=self.text_column,
                              eval_fraction=self.eval_fraction)  # fmt: skip
        sequences = prefetch(lambda: pack_sequences(docs, self.tokenizer, self.context_size), 64)
        stream = activation_stream(
            self.model, sequences, self.keys,
            batch_size=self.model_batch_size, skip_ids=self.skip, start=fill * self.buffer_size,
        )  # fmt: skip
        parts: list[Batch] = []
        rows = 0
        for chunk in stream:  # no inference_mode: its tensors could not be saved for backward later
            for key, acts in chunk.acts.items():
                finite_rows(acts, lambda r, c=chunk, k=key: (
                    f"the model's layer {k[0]} {k[1]} at sequence {int(c.sequence[r])} position "
                    f"{int(c.position[r])}"))  # fmt: skip
            parts.append(chunk.acts)
            rows += len(chunk.token_ids)
            while rows >= self.buffer_size:
                bufs, rest = _split({k: torch.cat([p[k] for p in parts]) for k in self.keys},
                                    self.buffer_size)  # fmt: skip
                yield bufs, permutation(self.seed, fill, n=self.buffer_size), skip
                parts, rows, fill, skip = [rest], rows - self.buffer_size, fill + 1, 0
        if rows:
            last = {k: torch.cat([p[k] for p in parts]) for k in self.keys}
            yield last, permutation(self.seed, fill, n=rows), skip

    def memory_bytes(self) -> int:
        """What streaming holds at once beyond the model: the shuffle buffers (as
        `CachedActivations.memory_bytes`) and one forward's activations of the layers it runs."""
        # a layer's hidden states, its MLP's 4x-wide ones and the hooks' copies: ~8 [b, T, d]
        forward = 4 * self.model_batch_size * self.context_size * max(self.widths.values()) * 8
        return buffers_bytes(self.buffer_size, sum(self.widths.values()), self.prefetch) + forward

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Yield batches from batch index `start` on (see the module docstring)."""
        device = next(self.model.parameters()).device
        buffers = prefetch(lambda: self._buffers(start * self.batch_size), self.prefetch)
        return _batches(buffers, self.batch_size, self.dtype, device)


def finite_rows(rows: Tensor, where: Any) -> None:
    """Raise a ValueError naming `where(first bad row)` if any value of `rows [n, W]` is NaN or
    inf: one such vector is enough to turn every SAE trained on it into NaN."""
    bad = ~torch.isfinite(rows)
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0, 0])
        raise ValueError(
            f"{where(row)}: a non-finite activation (NaN or inf); the cache is damaged or the model "
            "overflowed there. Recompute the cache (`gemmascope cache --verify`), or cache in float32"
        )


def _split(bufs: Batch, n: int) -> tuple[Batch, Batch]:
    return {k: v[:n] for k, v in bufs.items()}, {k: v[n:] for k, v in bufs.items()}


def _batches(
    buffers: Iterator[tuple[Batch, np.ndarray, int]],
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Iterator[Batch]:
    """Cut permuted buffers into batches; a batch may take its rows from two buffers."""
    carry: list[Batch] = []
    have = 0
    for bufs, perm, skip in buffers:
        perm_t = torch.from_numpy(perm)
        pos = skip
        while pos < len(perm_t):
            take = min(batch_size - have, len(perm_t) - pos)
            idx = perm_t[pos : pos + take]
            carry.append({k: v[idx.to(v.device)] for k, v in bufs.items()})  # (take, W)
            have, pos = have + take, pos + take
            if have == batch_size:
                yield _emit(carry, dtype, device)
                carry, have = [], 0
    if have:
        yield _emit(carry, dtype, device)


def _emit(parts: list[Batch], dtype: torch.dtype, device: torch.device) -> Batch:
    return {
        k: (parts[0][k] if len(parts) == 1 else torch.cat([p[k] for p in parts])).to(device, dtype)
        for k in parts[0]
    }


def buffers_bytes(rows: int, width: int, prefetch: int) -> int:
    """Shuffle buffers of `rows` float32 vectors `width` wide with their int64 order: the one in use,
    `prefetch` ready and one being filled."""
    return (prefetch + 2) * rows * (4 * width + 8)
