"""Build or resume an activation cache: the model over a corpus, every hooked site in one pass.

See `gemmascope.activations` for the layout on disk; `files` owns the manifest and the shards.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gemmascope import models
from gemmascope.activations.config import CacheConfig
from gemmascope.activations.files import (
    TOKEN_BYTES,
    absorb_pending,
    check_disk,
    open_manifest,
    orphan_cleanup,
    rank_shards,
    shard_writer,
    write_pending,
)
from gemmascope.activations.stream import Chunk, activation_stream, model_autocast, prefetch
from gemmascope.common import distributed
from gemmascope.common.devices import resolve_device
from gemmascope.common.files import write_json
from gemmascope.common.progress import progress_bar
from gemmascope.corpus import iter_documents, pack_sequences, special_ids
from gemmascope.models import SiteKey
from gemmascope.sae import dtype_of


def build_cache(
    cfg: CacheConfig, *, model: Any = None, tokenizer: Any = None, progress: bool = True
) -> Path:
    """Write (or resume) an activation cache; return its folder.

    Args:
        cfg: the run (see `CacheConfig`).
        model, tokenizer: an already loaded model (tests, benchmarks); default `load_model(cfg.model)`.
        progress: show a progress bar (tokens/s, ETA, disk used) on stderr.

    Returns:
        `cfg.out`, holding a complete cache of exactly `cfg.tokens` tokens.

    Under `torchrun` every rank writes whole shards of its own slice of the stream and rank 0 names
    them in the one manifest: the same files one process writes, resumable on any number of ranks.
    """

    device = resolve_device(cfg.device)
    distributed.init(device)
    model, tokenizer = models.given_or_loaded(cfg.model, model, tokenizer, device=device,
                                              caller="build_cache")  # fmt: skip
    info = models.model_info(model)
    keys = [
        (layer, site)
        for layer in models.parse_layers(cfg.layers, info.n_layers)
        for site in cfg.sites
    ]
    for layer, site in keys:
        models.check_site(model, layer, site)
    models.check_forward(model, cfg.batch_size, cfg.context_size)
    widths = {key: info.site_width(key[1]) for key in keys}
    skip = [] if cfg.keep_special else special_ids(tokenizer)
    if distributed.active():
        return _build_on_ranks(cfg, model, tokenizer, (info, keys, widths, skip), progress)
    manifest, _ = _open_cache(cfg, model, tokenizer, (info, keys, widths, skip), keep_pending=False)
    done = sum(s["tokens"] for s in manifest["shards"])
    if done == cfg.tokens:
        return cfg.out
    stream, sequences = _stream(cfg, model, tokenizer, keys, skip, done, cfg.tokens)
    bar = _progress_bar(cfg.tokens, done, progress)
    try:
        with torch.inference_mode(), model_autocast(model, cfg.dtype):
            shard_writer(cfg.out, manifest, stream, widths, dtype_of(cfg.dtype), bar)
    finally:
        bar.close()
        sequences.close()  # stops the tokenising thread
    _check_count(cfg, sum(s["tokens"] for s in manifest["shards"]))
    return cfg.out


def _open_cache(
    cfg: CacheConfig, model: Any, tokenizer: Any, what: tuple, *, keep_pending: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Open or resume the manifest, check the disk, write the manifest and clear leftovers.

    Returns the manifest and the finished shards beyond its prefix that a torchrun left (kept only
    with `keep_pending`; one process recomputes them).
    """

    info, keys, widths, skip = what
    itemsize = torch.empty(0, dtype=dtype_of(cfg.dtype)).element_size()
    bytes_per_token = sum(widths.values()) * itemsize + TOKEN_BYTES
    manifest = open_manifest(cfg, model, tokenizer, info, keys, widths, skip, bytes_per_token)
    pending = absorb_pending(cfg.out, manifest, verify=cfg.verify)
    if not keep_pending:
        for entry in pending:
            (cfg.out / "pending" / f"shard-{entry['index']:05d}.json").unlink()
        pending = []
    done = sum(s["tokens"] for s in [*manifest["shards"], *pending])
    check_disk(cfg.out, (cfg.tokens - done) * bytes_per_token, cfg.tokens - done, bytes_per_token)
    write_json(cfg.out / "manifest.json", manifest)
    orphan_cleanup(cfg.out, manifest, pending)
    return manifest, pending


def _build_on_ranks(
    cfg: CacheConfig, model: Any, tokenizer: Any, what: tuple, progress: bool
) -> Path:
    """Each rank writes its share of the missing shards; rank 0 then names them in the manifest."""
    from gemmascope.activations.files import absorb_pending

    plan = None
    if distributed.is_main():
        manifest, pending = _open_cache(cfg, model, tokenizer, what, keep_pending=True)
        plan = (manifest, [e["index"] for e in pending])
    manifest, pending_idx = distributed.broadcast_object(plan)  # type: ignore[misc]
    _, keys, widths, skip = what
    size = manifest["shard_tokens"]
    done = set(range(len(manifest["shards"]))) | set(pending_idx)
    runs = rank_shards(-(-cfg.tokens // size), done, distributed.rank(), distributed.world_size())
    mine = sum(min(r.stop * size, cfg.tokens) - r.start * size for r in runs)
    bar = _progress_bar(mine, 0, progress and distributed.is_main())
    try:
        for shards in runs:
            lo, hi = shards.start * size, min(shards.stop * size, cfg.tokens)
            stream, sequences = _stream(cfg, model, tokenizer, keys, skip, lo, hi)
            try:
                with torch.inference_mode(), model_autocast(model, cfg.dtype):
                    shard_writer(cfg.out, manifest, stream, widths, dtype_of(cfg.dtype), bar,
                                 first=shards.start, record=lambda e: write_pending(cfg.out, e))  # fmt: skip
            finally:
                sequences.close()
    finally:
        bar.close()
    distributed.barrier()
    got = None
    if distributed.is_main():
        absorb_pending(cfg.out, manifest, verify=False)
        got = sum(s["tokens"] for s in manifest["shards"])
        if manifest["complete"]:
            shutil.rmtree(cfg.out / "pending", ignore_errors=True)
    _check_count(cfg, distributed.broadcast_object(got))  # type: ignore[arg-type]
    return cfg.out


def _stream(
    cfg: CacheConfig,
    model: Any,
    tokenizer: Any,
    keys: list[SiteKey],
    skip: list[int],
    lo: int,
    hi: int,
) -> tuple[Iterator[Chunk], Any]:
    """The activations of stream positions [lo, hi), and the tokenising thread (close it after)."""

    docs = iter_documents(cfg.corpus, cfg.split, text_column=cfg.text_column,
                          eval_fraction=cfg.eval_fraction)  # fmt: skip
    sequences = prefetch(lambda: pack_sequences(docs, tokenizer, cfg.context_size), 64)
    stream = activation_stream(model, sequences, keys, batch_size=cfg.batch_size, skip_ids=skip,
                               start=lo, stop=hi)  # fmt: skip
    return stream, sequences


def _check_count(cfg: CacheConfig, got: int) -> None:
    if got != cfg.tokens:
        raise RuntimeError(
            f"corpus {cfg.corpus!r} ({cfg.split} split) ran out after {got:,} of {cfg.tokens:,} "
            f"tokens at context size {cfg.context_size}; the cache at {cfg.out} keeps them. Ask for "
            "fewer --tokens, use the other documents (--eval-fraction) or a bigger --corpus"
        )


def _progress_bar(total: int, done: int, enabled: bool) -> Any:
    return progress_bar(total, initial=done, unit="tok", unit_scale=True, desc="cache",
                        enabled=enabled)  # fmt: skip
