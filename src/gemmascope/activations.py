"""Activations from a model: one forward per batch serves every hooked (layer, site); a resumable disk cache.

Sequences are numbered 0, 1, 2, ... in corpus order and forwarded in batches aligned on multiples of
`batch_size` sequences (the last one filled up too), so a batch holds the same sequences, and so gives
the same numbers, whether a run starts from zero, resumes, or stops at another token count. The
collected positions (all but BOS/EOS/pad unless `keep_special`) form one *stream*; a cache stores
stream positions [0, tokens) in shards of `shard_tokens`.

Cache layout (`OUT/`):

    manifest.json                      what was cached and how; names only complete shards
    tokens/shard-00000.safetensors     token_ids [n] int32, sequence [n] int64, position [n] int32,
                                       sequences [s, context_size] int32, sequence_ids [s] int64
    L03.resid_post/shard-00000.safetensors   activations [n, width] in the cache dtype
    ...

Row i of every file of a shard is the same token: `token_ids[i]` sits at `position[i]` of global
sequence `sequence[i]`, whose full tokens are the row of `sequences` where `sequence_ids` matches, so
any activation traces back to its text. Each shard file is written atomically, then the manifest is
rewritten atomically; a killed run resumes from the first missing shard and ends with exactly the
requested number of tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import re
import shutil
import sys
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

from gemmascope.corpus import EVAL_FRACTION, Split, collected_mask, fingerprint, special_ids
from gemmascope.io.atomic import write_json
from gemmascope.sae import dtype_of

Key = tuple[int, str]
T = TypeVar("T")
FORMAT = "gemmascope-activations"
FORMAT_VERSION = 1
SHARD_BYTES = 1 << 30
"""Default shard size in bytes over all sites: at most this much work is redone after a kill."""
TOKEN_BYTES = 24
"""Disk per token for the token files (ids, sequence, position, and the sequences table)."""


class Chunk(NamedTuple):
    """The collected positions of one forward batch, in stream order (`n` rows)."""

    start: int
    """Stream position of the first row."""
    acts: dict[Key, Tensor]
    """(layer, site) -> [n, width] activations, on the model's device and dtype."""
    token_ids: Tensor
    """[n] int32 token at each row."""
    sequence: Tensor
    """[n] int64 global index of each row's sequence."""
    position: Tensor
    """[n] int32 position of each row in its sequence."""
    sequences: dict[int, np.ndarray]
    """Global sequence index -> its [context_size] tokens, for the sequences with rows here."""


def site_dir(key: Key) -> str:
    """Folder of one (layer, site) inside a cache, e.g. `L03.resid_post`."""
    return f"L{key[0]:02d}.{key[1]}"


def parse_count(text: str | int) -> int:
    """Parse a token count such as `5M`, `250k`, `1.5B` or `4096`."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d_]+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*", text)
    if m is None:
        raise ValueError(f"cannot read the count {text!r}; write e.g. 4096, 250k, 5M or 1.5B")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    return int(round(float(m.group(1).replace("_", "")) * scale))


def activation_stream(
    model: torch.nn.Module,
    sequences: Iterable[np.ndarray],
    keys: Sequence[Key],
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
    keys: Sequence[Key],
    start: int,
    stop: int | None,
) -> Chunk:
    from gemmascope.hooks import collect

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


@dataclass
class CacheConfig:
    """A `gemmascope cache` run: which activations to compute and where to keep them."""

    out: Path
    """Cache folder; rerunning with the same settings resumes it."""
    model: str = "gemma-3-270m"
    """Model name or local path, as `models.load_model` takes it."""
    layers: str = "all"
    """Layer spec, e.g. `0-17`, `3,6,9` or `all`."""
    sites: list[str] = field(default_factory=lambda: ["resid_post"])
    """Sites within each layer (`resid_post`, `mlp_out`, `attn_z`, ...)."""
    tokens: int = 1_000_000
    """Activation vectors to cache per (layer, site): exactly this many collected positions."""
    corpus: str = "default"
    """`default`, a .txt/.jsonl/.parquet file, folder or glob, or a Hugging Face dataset name."""
    text_column: str = "text"
    """Text field of .jsonl/.parquet/Hugging Face rows."""
    split: Split = "train"
    """`train` or the held-out `eval` documents (by hash, see `corpus.in_eval_split`)."""
    eval_fraction: float = EVAL_FRACTION
    """Share of documents held out for evaluation."""
    context_size: int = 1024
    """Tokens per sequence, BOS included (Gemma Scope: 1024)."""
    batch_size: int = 8
    """Sequences per forward."""
    dtype: str = "float32"
    """Storage dtype: `float32`, `bfloat16` or `float16`."""
    keep_special: bool = False
    """Also collect BOS, EOS and padding positions (Gemma Scope did not)."""
    shard_tokens: int | None = None
    """Tokens per shard; None picks about 1 GiB per shard over all sites."""
    device: str = "auto"
    """Where the model runs: cpu, cuda, cuda:N, mps, or auto (this rank's GPU if there is one)."""
    verify: bool = False
    """On resume, check the sha256 of every existing shard, not only its size."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"`dtype` {self.dtype!r}: choose float32, bfloat16 or float16")
        if self.split not in ("train", "eval"):
            raise ValueError(f"`split` {self.split!r}: choose train or eval")
        for name in ("tokens", "context_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.shard_tokens is not None and self.shard_tokens <= 0:
            raise ValueError(f"`shard_tokens` must be positive, got {self.shard_tokens}")
        if not self.sites:
            raise ValueError("`sites` is empty; name at least one, e.g. resid_post")
        from gemmascope.distributed import check_device

        check_device(self.device)


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
    from gemmascope import distributed, models
    from gemmascope.cache_files import shard_writer

    device = distributed.resolve_device(cfg.device)
    distributed.init(device)
    if model is None:
        model, tokenizer = models.load_model(cfg.model, device=device)
    elif tokenizer is None:
        raise ValueError("build_cache got a `model` but no `tokenizer`; pass both, or neither")
    info = models.model_info(model)
    keys = [
        (layer, site)
        for layer in models.parse_layers(cfg.layers, info.n_layers)
        for site in cfg.sites
    ]
    for layer, site in keys:
        models.check_site(model, layer, site)
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
    from gemmascope.cache_files import absorb_pending, check_disk, open_manifest, orphan_cleanup

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
    from gemmascope import distributed
    from gemmascope.cache_files import absorb_pending, rank_shards, shard_writer, write_pending

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


def model_autocast(model: Any, dtype: str) -> contextlib.AbstractContextManager:
    """On a CUDA GPU, run the model's matmuls in the (lower) storage dtype under autocast, which keeps
    norms and softmax in float32; elsewhere, and for float32 storage, run it as loaded."""
    device = next(model.parameters()).device
    if device.type == "cuda" and dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=dtype_of(dtype))
    return contextlib.nullcontext()


def _stream(
    cfg: CacheConfig, model: Any, tokenizer: Any, keys: list[Key], skip: list[int], lo: int, hi: int
) -> tuple[Iterator[Chunk], Any]:
    """The activations of stream positions [lo, hi), and the tokenising thread (close it after)."""
    from gemmascope.corpus import iter_documents, pack_sequences

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
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="tok", unit_scale=True, desc="cache",
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)  # fmt: skip


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    for p in [path, *path.parents]:
        if p.exists():
            return shutil.disk_usage(p).free
    return shutil.disk_usage(".").free


def model_identity(model: Any, info: Any, name: str) -> dict[str, Any]:
    """What a manifest records about the model, so a cache is never read as another model's.

    The folder it was loaded from is kept apart (`model_path`): moving the user cache must not
    make a resumed run look like another model's.
    """
    return {
        "name": name,
        "revision": getattr(getattr(model, "config", None), "_commit_hash", None),
        "family": info.family,
        "n_layers": info.n_layers,
        "d_model": info.d_model,
    }


def corpus_identity(cfg: CacheConfig) -> dict[str, Any]:
    """The corpus, split and packing that define the token stream of a cache."""
    return {
        **fingerprint(cfg.corpus, text_column=cfg.text_column),
        "split": cfg.split,
        "eval_fraction": cfg.eval_fraction,
    }


def config_dict(cfg: CacheConfig) -> dict[str, Any]:
    """The run config as JSON-ready values."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}


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
