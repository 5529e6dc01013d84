"""Build a feature index: run an SAE over a corpus and keep, per latent, what the explorer shows.

The corpus is packed into BOS-led sequences (as for training) and processed in chunks of
`batch_size` sequences: one forward to the SAE's site, one encode, one merge into `FeatureStats`.
BOS, EOS and padding positions never count (Gemma Scope skipped them too). Every
`checkpoint_seconds` the statistics are saved to `OUT.partial` (atomically, with the number of chunks
done); a killed run started again with the same settings continues from there. At the end the logit
lens is computed and the SQLite file is written through a temp file and one rename (see `store`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gemmascope
from gemmascope.clt import CLT
from gemmascope.common.config import check, option
from gemmascope.common.devices import resolve_device
from gemmascope.common.progress import progress_bar
from gemmascope.common.units import Count
from gemmascope.corpus import CorpusSplit, fingerprint, iter_documents, pack_sequences, special_ids
from gemmascope.evaluate.feature_stats import FeatureStats, token_decoder
from gemmascope.explore.checkpoint import checkpoint_path, existing_index, resume, save_checkpoint
from gemmascope.explore.lens import logit_lens
from gemmascope.explore.store import write_index
from gemmascope.models import check_forward, given_or_loaded
from gemmascope.sae import SAE


@dataclass
class IndexConfig:
    """One index run; every field but `out`, `device` and `checkpoint_seconds` must match to resume."""

    sae_source: str = option("", positional=True, required=True)
    """params.npz, SAE folder or Hugging Face repo id (as `gemmascope.io.load` takes)."""
    out: Path = option(Path("index.sqlite"), required=True)
    """The `.sqlite` file to write; `OUT.partial` holds the checkpoint while it runs."""
    sae_id: str | None = None
    """Which SAE of a folder or repo holding several."""
    clt_layer: int | None = option(None, ge=0)
    """For a cross-layer transcoder: which of its layers' latents to index (0 = its first); they
    encode as the CLT does, and their logit lens reads their own layer's decoder rows."""
    model: str = "gemma-3-270m"
    """The model the SAE reads: `gemma-3-270m` (embedded), a hub name or a local folder."""
    layer: int | None = option(None, ge=0)
    """Layer of the SAE's site; default the SAE config's `layer`."""
    site: str | None = None
    """Site the SAE reads; default the SAE config's `site`."""
    corpus: str = "default"
    """Text source (see `gemmascope.corpus`)."""
    split: CorpusSplit = "train"
    """`train`, `eval` or `all` documents of the corpus."""
    text_column: str = "text"
    """Text field of .jsonl/.parquet/HF rows."""
    tokens: Count = option(1_000_000, ge=1)
    """Positions to forward (rounded up to whole sequences); BOS/EOS/pad among them do not count."""
    context_size: int = option(1024, ge=2)
    """Tokens per sequence, BOS included."""
    batch_size: int = option(4, ge=1)
    """Sequences per chunk (one forward, one merge)."""
    top_k: int = option(20, ge=1)
    """Top activating contexts kept per latent."""
    window: int = option(16, ge=0)
    """Tokens kept on each side of an activating token."""
    bands: int = option(4, ge=1)
    """Octave bands below the top that are sampled (see `FeatureStats`)."""
    samples: int = option(3, ge=1)
    """Contexts sampled per band."""
    bins: int = option(64, ge=2)
    """Histogram bins (a power of two)."""
    lens_k: int = option(10, ge=1)
    """Logit-lens tokens kept at each end."""
    seed: int = option(0, ge=0)
    """Seeds the band sampling."""
    checkpoint_seconds: float = option(60.0, ge=0)
    """Save the running statistics at most this often (0: after every chunk)."""
    device: str = "auto"
    """Torch device for the model and the SAE: cpu, cuda, cuda:N, mps or auto (a GPU if any)."""
    overwrite: bool = False
    """Replace `out` if it holds something else than this run's index (refused otherwise)."""

    def __post_init__(self) -> None:
        check(self)
        self.out = Path(self.out)
        for name in ("tokens", "context_size", "batch_size", "lens_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.context_size < 2:
            raise ValueError(
                f"`context_size` must be at least 2 (BOS + one token), got {self.context_size}"
            )
        if self.split not in ("train", "eval", "all"):
            raise ValueError(f"unknown `split` {self.split!r}; choose `train`, `eval` or `all`")
        if self.bins < 2 or self.bins & (self.bins - 1):
            raise ValueError(f"`bins` must be a power of two >= 2, got {self.bins}")
        for name in ("top_k", "bands", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.window < 0:
            raise ValueError(f"`window` must be >= 0, got {self.window}")
        if self.checkpoint_seconds < 0:
            raise ValueError(f"`checkpoint_seconds` must be >= 0, got {self.checkpoint_seconds}")


def build_index(
    cfg: IndexConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    sae: SAE | CLT | None = None,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Index an SAE over a corpus (or resume an interrupted run) and write `cfg.out`.

    Args:
        cfg: the run (see `IndexConfig`).
        model, tokenizer: an already loaded model (tests, benchmarks); default `load_model(cfg.model)`.
        sae: an already loaded SAE; default `io.load(cfg.sae_source, cfg.sae_id)`.
        progress: show a progress bar on stderr.
        on_chunk: called with each chunk's index after it is merged (and checkpointed, if due).
    Returns:
        `cfg.out`.
    """
    return build_indexes([cfg], model=model, tokenizer=tokenizer, saes=[sae], progress=progress,
                         on_chunk=on_chunk)[0]  # fmt: skip


SHARED = (
    "model",
    "corpus",
    "split",
    "text_column",
    "tokens",
    "context_size",
    "batch_size",
    "device",
)
"""What the runs of `build_indexes` share: one corpus, read once, through one model."""


@dataclass
class _Job:
    """One index being built: its run, SAE, site, identity, running statistics and chunks merged."""

    cfg: IndexConfig
    sae: SAE
    layer: int
    site: str
    identity: dict[str, Any]
    stats: FeatureStats
    done: int


def build_indexes(
    cfgs: list[IndexConfig],
    *,
    model: Any = None,
    tokenizer: Any = None,
    saes: list[SAE | CLT | None] | None = None,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> list[Path]:
    """Index several SAEs of one model over one corpus with one forward per chunk, stopped after
    the deepest site read (a suite indexes a whole group of layers so).

    Each run keeps its own checkpoint and resumes on its own; an index already written with the same
    settings is left as it is. The runs must agree on `SHARED`.

    Returns:
        Each run's `out`.
    """
    if not cfgs:
        raise ValueError("no index to build: pass at least one IndexConfig")
    first = cfgs[0]
    for c in cfgs[1:]:
        diffs = [k for k in SHARED if getattr(c, k) != getattr(first, k)]
        if diffs:
            raise ValueError(f"indexes built together share {', '.join(SHARED)}; {c.out} differs "
                             f"from {first.out} in {', '.join(diffs)}")  # fmt: skip
    outs = [c.out.resolve() for c in cfgs]
    if len(set(outs)) != len(outs):
        raise ValueError("two runs write the same index file; give each its own `out`")
    existing = [existing_index(c.out, c.overwrite) for c in cfgs]
    device = resolve_device(first.device)
    model, tokenizer = given_or_loaded(first.model, model, tokenizer, device=device,
                                       caller="build_index")  # fmt: skip
    given = saes or [None] * len(cfgs)
    check_forward(model, first.batch_size, first.context_size)
    jobs = []
    for c, sae, found in zip(cfgs, given, existing, strict=True):
        job = _job(c, _load_sae(c, sae, device), model, found)
        if job is not None:
            jobs.append(job)
    if jobs:
        _run(first, jobs, model, tokenizer, progress, on_chunk)
    return [c.out for c in cfgs]


def _job(cfg: IndexConfig, sae: SAE, model: Any, existing: dict[str, Any] | None) -> _Job | None:
    """The job of one run, its checkpoint loaded; None when its index is already written."""
    layer, site = _where(cfg, sae, model)
    identity = _identity(cfg, sae, layer, site)
    if existing is not None and not cfg.overwrite:
        diffs = sorted(k for k in identity if existing.get(k) != identity[k])
        if not diffs:
            return None  # this very index is done: nothing to redo
        raise FileExistsError(
            f"{cfg.out}: an index made with other settings ({', '.join(diffs)} differ); pass "
            "--overwrite to replace it, or choose another --out"
        )
    stats = FeatureStats(sae.cfg.d_sae, top_k=cfg.top_k, window=cfg.window, bands=cfg.bands,
                         samples=cfg.samples, bins=cfg.bins, seed=cfg.seed, device=sae.device)  # fmt: skip
    done = resume(checkpoint_path(cfg.out), identity, stats)
    return _Job(cfg, sae, layer, site, identity, stats, done)


def _run(
    cfg: IndexConfig,
    jobs: list[_Job],
    model: Any,
    tokenizer: Any,
    progress: bool,
    on_chunk: Callable[[int], None] | None,
) -> None:
    """Forward the corpus once for every job, merge each chunk into the jobs that lack it, write."""
    n_seq = math.ceil(cfg.tokens / cfg.context_size)
    skip = special_ids(tokenizer)
    docs = iter_documents(cfg.corpus, cfg.split, text_column=cfg.text_column)
    sequences = itertools.islice(pack_sequences(docs, tokenizer, cfg.context_size), n_seq)
    start = min(j.done for j in jobs)
    bar = progress_bar(math.ceil(n_seq / cfg.batch_size), initial=start, unit="chunk",
                       desc="index" if len(jobs) == 1 else f"index {len(jobs)} SAEs",
                       enabled=progress)  # fmt: skip
    saved_at, seen = time.monotonic(), 0
    saved = {id(j): j.done for j in jobs}
    try:
        for chunk, batch in enumerate(_batched(sequences, cfg.batch_size)):
            seen += len(batch)
            todo = [j for j in jobs if j.done <= chunk]
            if not todo:
                continue  # merged before the interruption: tokenised again, not forwarded
            _index_chunk(model, todo, batch, skip, chunk, cfg.batch_size)
            if time.monotonic() - saved_at >= min(j.cfg.checkpoint_seconds for j in jobs):
                for j in todo:
                    save_checkpoint(checkpoint_path(j.cfg.out), j.identity, j.stats, j.done)
                    saved[id(j)] = j.done
                saved_at = time.monotonic()
            bar.update(1)
            if on_chunk is not None:
                on_chunk(chunk)
    finally:
        bar.close()
    if seen < n_seq:
        print(f"warning: corpus {cfg.corpus!r} ({cfg.split} split) ran out after {seen:,} of "
              f"{n_seq:,} sequences; indexing those", file=sys.stderr)  # fmt: skip
    for j in jobs:  # the lens and the writes take a while: keep every job's chunks safe meanwhile
        if saved[id(j)] < j.done:
            save_checkpoint(checkpoint_path(j.cfg.out), j.identity, j.stats, j.done)
    for j in jobs:
        lens = logit_lens(model, j.sae, j.layer, j.site, k=j.cfg.lens_k)
        spec = (j.sae.cfg.extra or {}).get("spec", {})
        meta = {**j.identity, "sae_source": _portable(j.cfg.sae_source),
                "model": _portable(j.cfg.model), "sae_name": Path(j.cfg.sae_source).name,
                "target_l0": spec.get("target_l0") or j.sae.cfg.k,
                "sequences": seen, "positions": seen * cfg.context_size,
                "tokens_indexed": int(j.stats.n_tokens), "special_ids": skip,
                "gemmascope_version": gemmascope.__version__,
                "lens": "W_dec -> residual stream -> final-norm scale -> W_U (gemmascope.explore.lens)"}  # fmt: skip
        write_index(j.cfg.out, meta, j.stats, lens, token_decoder(tokenizer), cfg.context_size)
        checkpoint_path(j.cfg.out).unlink(missing_ok=True)


def _index_chunk(
    model: Any,
    jobs: list[_Job],
    batch: list[np.ndarray],
    skip: list[int],
    chunk: int,
    batch_size: int,
) -> None:
    """One forward to the deepest site of `jobs`, then one encode and one merge per job."""
    from gemmascope.hooks import collect

    tokens = torch.from_numpy(np.stack(batch)).long()  # (B, T)
    counted = ~torch.isin(tokens, torch.tensor(skip, dtype=tokens.dtype))  # (B, T), for every job
    device = next(model.parameters()).device
    with torch.no_grad():
        acts = collect(model, tokens.to(device), [(j.layer, j.site) for j in jobs])
        for j in jobs:
            x = acts[j.layer, j.site]  # (B, T, width)
            z = j.sae.encode(x.to(j.sae.device)).float()  # (B, T, d_sae)
            j.stats.update(z, tokens.to(z.device), counted.to(z.device),
                           first_sequence=chunk * batch_size, chunk=chunk)  # fmt: skip
            j.done = chunk + 1


def _load_sae(cfg: IndexConfig, sae: SAE | CLT | None, device: Any) -> SAE:
    if sae is None:
        from gemmascope import io

        sae = io.load(cfg.sae_source, cfg.sae_id, device=device)
    return layer_of(sae, cfg.clt_layer, cfg.sae_source).eval()


def layer_of(sae: SAE | CLT, clt_layer: int | None, source: str) -> SAE:
    """The SAE to index: `sae` itself, or layer `clt_layer` of a cross-layer transcoder."""
    if not isinstance(sae, CLT):
        if clt_layer is not None:
            raise ValueError(f"--clt-layer {clt_layer}: {source} is not a cross-layer transcoder")
        return sae
    if clt_layer is None or clt_layer >= sae.n_layers:
        raise ValueError(
            f"{source} is a cross-layer transcoder over layers {sae.layers.start}.."
            f"{sae.layers.stop - 1}; pass --clt-layer N (0..{sae.n_layers - 1}) to index the "
            "latents of one of its layers"
        )
    return sae.layer_transcoder(clt_layer)


def _where(cfg: IndexConfig, sae: SAE, model: Any) -> tuple[int, str]:
    """The (layer, site) to read: the flags, else the SAE's config; widths must agree."""
    from gemmascope.models import check_site, model_info

    layer = cfg.layer if cfg.layer is not None else sae.cfg.layer
    site = cfg.site or sae.cfg.site
    if layer is None or site is None:
        raise ValueError(
            f"the SAE {cfg.sae_source!r} does not say where it reads (layer {layer}, site {site}); "
            "pass `--layer` and `--site`"
        )
    info = model_info(model)
    check_site(info, layer, site)
    if info.site_width(site) != sae.cfg.d_in:
        raise ValueError(
            f"layer {layer} {site} of model {cfg.model!r} is {info.site_width(site)} wide but the SAE "
            f"reads d_in={sae.cfg.d_in}; pass the model the SAE was trained on (`--model`)"
        )
    return layer, site


def _identity(cfg: IndexConfig, sae: SAE, layer: int, site: str) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (also the index's meta)."""
    fields = dataclasses.asdict(cfg)
    for name in ("out", "device", "checkpoint_seconds", "overwrite", "layer", "site", "sae_source",
                 "model"):  # fmt: skip
        fields.pop(name)
    return {**fields, "sae_source_given": cfg.sae_source, "model_given": cfg.model,
            "layer": layer, "site": site, "d_sae": sae.cfg.d_sae, "d_in": sae.cfg.d_in,
            "architecture": sae.cfg.architecture, "sae_sha256": sae.sha256(),
            "corpus_fingerprint": fingerprint(cfg.corpus, text_column=cfg.text_column)}  # fmt: skip


def _portable(source: str) -> str:
    """A local path made absolute (the explorer may start elsewhere); names and repo ids unchanged."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _batched(items: Iterable[np.ndarray], n: int) -> Iterator[list[np.ndarray]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch
