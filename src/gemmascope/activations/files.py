"""The files of an activation cache: manifest, resume checks, shard writing and shard validation.

See `gemmascope.activations` for the layout. The manifest is the single source of truth: a shard
exists when the manifest names it, and every file it names carries its size and sha256.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from gemmascope.activations.config import CacheConfig, corpus_identity, model_identity
from gemmascope.activations.stream import Chunk, site_dir
from gemmascope.common.config import flat
from gemmascope.common.files import atomic_file, read_versioned, sha256_file, write_json
from gemmascope.models import SiteKey

FORMAT = "gemmascope-activations"


FORMAT_VERSION = 1


SHARD_BYTES = 1 << 30
"""Default shard size in bytes over all sites: at most this much work is redone after a kill."""


TOKEN_BYTES = 24
"""Disk per token for the token files (ids, sequence, position, and the sequences table)."""


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    for p in [path, *path.parents]:
        if p.exists():
            return shutil.disk_usage(p).free
    return shutil.disk_usage(".").free


_SHARD = re.compile(r"shard-\d{5}\.safetensors")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read `manifest.json` of the cache at `path` (the folder or the file), checking its format."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / "manifest.json"
    return read_versioned(
        file, FORMAT, FORMAT_VERSION, fix="recreate it with `gemmascope cache` in a new folder",
        missing=f"is {file.parent} an activation cache written by `gemmascope cache`?",
    )  # fmt: skip


def open_manifest(
    cfg: CacheConfig,
    model: Any,
    tokenizer: Any,
    info: Any,
    keys: list[SiteKey],
    widths: dict[SiteKey, int],
    skip: list[int],
    bytes_per_token: int,
) -> dict[str, Any]:
    """The manifest of a new cache at `cfg.out`, or of one written with the same settings (resume).

    Nothing is written here: the caller checks the disk first, then writes the manifest.
    """
    identity = {
        "model": model_identity(model, info, cfg.model),
        "corpus": corpus_identity(cfg),
        "tokenizer": {"vocab_size": len(tokenizer), "skipped_ids": skip},
        "context_size": cfg.context_size,
        "dtype": cfg.dtype,
        "sites": [
            {"layer": k[0], "site": k[1], "width": widths[k], "dir": site_dir(k)} for k in keys
        ],
    }
    file = cfg.out / "manifest.json"
    if file.exists():
        manifest = read_manifest(file)
        _check_same_run(file, manifest, identity, cfg)
        manifest["shards"] = _valid_prefix(cfg, manifest)
    elif cfg.out.exists() and any(cfg.out.iterdir()):
        raise FileExistsError(
            f"{cfg.out}: not empty and holds no manifest.json; give `--out` a new or empty folder"
        )
    else:
        shard_tokens = cfg.shard_tokens or max(1024, SHARD_BYTES // bytes_per_token // 1024 * 1024)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "identity": identity,
                    "shard_tokens": shard_tokens, "shards": []}  # fmt: skip
    done = sum(s["tokens"] for s in manifest["shards"])
    manifest.update(tokens=cfg.tokens, complete=done == cfg.tokens, config=flat(cfg),
                    model_path=getattr(model.config, "name_or_path", None) or None,
                    tokenizer_name=getattr(tokenizer, "name_or_path", None))  # fmt: skip
    return manifest


def _check_same_run(
    file: Path, manifest: dict[str, Any], identity: dict[str, Any], cfg: CacheConfig
) -> None:
    diffs = [k for k in identity if manifest["identity"].get(k) != identity[k]]
    if cfg.shard_tokens is not None and cfg.shard_tokens != manifest["shard_tokens"]:
        diffs.append("shard_tokens")
    if diffs:
        detail = "; ".join(
            f"{k}: cache has {manifest['identity'].get(k, manifest.get(k))}, "
            f"this run {identity.get(k, cfg.shard_tokens)}"
            for k in diffs
        )
        raise ValueError(
            f"{file}: written by a different run ({detail}); rerun with the same settings to "
            "resume, or give `--out` a new folder"
        )
    cached = sum(s["tokens"] for s in manifest["shards"])
    if cached > cfg.tokens:
        raise ValueError(
            f"{file}: the cache already holds {cached:,} tokens, more than the {cfg.tokens:,} asked; "
            "ask for at least that many, or give `--out` a new folder"
        )


def _valid_prefix(cfg: CacheConfig, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards to keep on resume: complete, right-sized, files intact; recompute from the first bad."""
    size = manifest["shard_tokens"]
    kept: list[dict[str, Any]] = []
    for k, entry in enumerate(manifest["shards"]):
        expected = min(size, cfg.tokens - k * size)
        if entry["tokens"] != expected:
            break  # the short last shard of a smaller (or cut-short) run: recompute it
        problem = next((p for p in (check_file(cfg.out / rel, meta, sha=cfg.verify)
                                    for rel, meta in entry["files"].items()) if p), None)  # fmt: skip
        if problem:
            print(f"warning: {problem}; recomputing from shard {k}", file=sys.stderr)
            break
        kept.append(entry)
    return kept


def check_file(path: Path, meta: dict[str, Any], *, sha: bool) -> str | None:
    """Why a shard file does not match its manifest entry (missing, size, sha256), or None if it does."""
    if not path.exists():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != meta["bytes"]:
        return f"{path}: {size:,} bytes, the manifest says {meta['bytes']:,} (truncated or overwritten)"
    if sha and sha256_file(path) != meta["sha256"]:
        return f"{path}: sha256 differs from the manifest's (the file is corrupt)"
    return None


def orphan_cleanup(out: Path, manifest: dict[str, Any], pending: list[dict[str, Any]] = ()) -> None:
    """Delete temp files and shard files that neither the manifest nor `pending` names (left by a
    killed run)."""
    named = {rel for s in [*manifest["shards"], *pending] for rel in s["files"]}
    folders = [out, out / "tokens", out / PENDING]
    folders += [out / s["dir"] for s in manifest["identity"]["sites"]]
    for folder in folders:
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            rel = f.relative_to(out).as_posix()
            stray_tmp = f.name.startswith(".") and f.name.endswith(".tmp")
            if f.is_file() and (stray_tmp or (_SHARD.fullmatch(f.name) and rel not in named)):
                f.unlink()


def check_disk(out: Path, need: int, tokens: int, bytes_per_token: int) -> None:
    """Refuse to start when the cache will not fit on its filesystem."""
    free = disk_free(out)
    margin = 64 << 20  # the manifest, the token files' tables, and room for the rest of the system
    if need + margin > free:
        raise RuntimeError(
            f"cache {out}: needs about {_fmt(need)} more ({tokens:,} tokens x {bytes_per_token:,} "
            f"bytes, plus {_fmt(margin)} kept free) but only {_fmt(free)} is free there; ask for "
            "fewer --tokens, hook fewer "
            "--layers/--sites, store --dtype bfloat16, or choose another --out"
        )


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def shard_writer(
    out: Path,
    manifest: dict[str, Any],
    stream: Iterator[Chunk],
    widths: dict[SiteKey, int],
    dtype: torch.dtype,
    bar: Any,
    *,
    first: int | None = None,
    record: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Fill shards from the stream in order, writing each as soon as it is full.

    The stream starts at shard `first` (default: the first the manifest lacks). Each finished shard's
    entry goes to `record`; by default it is named in the manifest, which is then rewritten.
    """
    size_max, total = manifest["shard_tokens"], manifest["tokens"]
    k = len(manifest["shards"]) if first is None else first
    record = record or (lambda entry: name_shards(out, manifest, [entry]))
    size = min(size_max, total - k * size_max)
    bufs = {key: torch.empty(size, w, dtype=dtype) for key, w in widths.items()}  # key -> (S, W)
    fill, tok_parts, seqs = 0, [], {}
    disk = sum(m["bytes"] for s in manifest["shards"] for m in s["files"].values())
    for chunk in stream:
        if not len(chunk.token_ids):  # a forward whose tokens were all skipped (BOS/EOS/pad)
            continue
        assert chunk.start == k * size_max + fill, "stream and shards out of step"
        seqs.update(chunk.sequences)
        off, n = 0, len(chunk.token_ids)
        while off < n:
            take = min(n - off, size - fill)
            for key, buf in bufs.items():
                buf[fill : fill + take].copy_(chunk.acts[key][off : off + take])
            tok_parts.append((chunk.token_ids[off : off + take], chunk.sequence[off : off + take],
                              chunk.position[off : off + take]))  # fmt: skip
            fill, off = fill + take, off + take
            if fill == size:
                entry = _finish_shard(out, size_max, k, bufs, fill, tok_parts, seqs)
                record(entry)
                disk += sum(f["bytes"] for f in entry["files"].values())
                bar.set_postfix_str(f"disk {_fmt(disk)}", refresh=False)
                k, fill, tok_parts = k + 1, 0, []
                size = min(size_max, total - k * size_max)
                if size <= 0:
                    bar.update(n)
                    return
        bar.update(n)
    if fill:  # the corpus ran out: keep what there is, marked incomplete
        record(_finish_shard(out, size_max, k, bufs, fill, tok_parts, seqs))


def name_shards(out: Path, manifest: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Append finished shards' entries to the manifest and rewrite it atomically."""
    manifest["shards"].extend(entries)
    manifest["complete"] = sum(s["tokens"] for s in manifest["shards"]) == manifest["tokens"]
    write_json(out / "manifest.json", manifest)


def _finish_shard(
    out: Path,
    shard_tokens: int,
    k: int,
    bufs: dict[SiteKey, torch.Tensor],
    n: int,
    tok_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    seqs: dict[int, Any],
) -> dict[str, Any]:
    """Write shard `k`'s files (each atomically) and return its manifest entry."""
    name = shard_name(k)
    sequence = torch.cat([p[1] for p in tok_parts])  # (n,) int64
    seq_ids = sorted(set(sequence.tolist()))
    tokens = {
        "token_ids": torch.cat([p[0] for p in tok_parts]).int(),  # (n,)
        "sequence": sequence,
        "position": torch.cat([p[2] for p in tok_parts]).int(),  # (n,)
        "sequences": torch.from_numpy(np.stack([seqs[i] for i in seq_ids])).int(),
        "sequence_ids": torch.tensor(seq_ids, dtype=torch.int64),  # (s,)
    }
    files = {f"tokens/{name}": _save(out / "tokens" / name, tokens)}
    for key, buf in bufs.items():
        rel = f"{site_dir(key)}/{name}"
        files[rel] = _save(out / rel, {"activations": buf[:n]})
    last = max(seq_ids)
    for i in [i for i in seqs if i < last]:
        del seqs[i]  # the last sequence may continue into the next shard
    return {"index": k, "start": k * shard_tokens, "tokens": n, "files": files}


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# ---------------------------------------------------------------- many ranks (torchrun)
# Under torchrun each rank writes whole shards of its own slice of the stream. The manifest names a
# gapless prefix of shards (readers rely on it), so a rank records each finished shard beside it in
# `pending/shard-NNNNN.json`; rank 0 moves entries that extend the prefix into the manifest, at the
# start (resume) and once every rank is done. A kill loses at most the shards being written.
PENDING = "pending"


def write_pending(out: Path, entry: dict[str, Any]) -> None:
    """Record a finished shard whose predecessors may not be named in the manifest yet."""
    write_json(out / PENDING / f"shard-{entry['index']:05d}.json", entry)


def absorb_pending(out: Path, manifest: dict[str, Any], *, verify: bool) -> list[dict[str, Any]]:
    """Name in the manifest the pending shards that extend its prefix; return the others still intact.

    Entries whose files are missing, damaged or of the wrong size are forgotten (their shards are
    recomputed); the manifest is rewritten when it grew.
    """
    folder = out / PENDING
    if not folder.is_dir():
        return []
    size, total = manifest["shard_tokens"], manifest["tokens"]
    entries = {}
    for f in sorted(folder.glob("shard-*.json")):
        try:
            entry = json.loads(f.read_text())
            k = int(entry["index"])
            intact = entry["tokens"] == min(size, total - k * size) and not any(
                check_file(out / rel, meta, sha=verify) for rel, meta in entry["files"].items()
            )
        except (OSError, ValueError, KeyError, TypeError):
            intact = False
        if intact and k >= len(manifest["shards"]):
            entries[k] = entry
        else:
            f.unlink()
    start = len(manifest["shards"])
    run = []
    while start + len(run) in entries:
        run.append(entries.pop(start + len(run)))
    if run:
        name_shards(out, manifest, run)
        for entry in run:
            (folder / f"shard-{entry['index']:05d}.json").unlink()
    return [entries[k] for k in sorted(entries)]


def rank_shards(n_shards: int, done: set[int], index: int, count: int) -> list[range]:
    """The shards rank `index` of `count` writes: its share of those not done, as runs of
    consecutive indices (each run is one pass over the stream)."""
    from gemmascope.common.distributed import shard_range

    todo = [k for k in range(n_shards) if k not in done]
    lo, hi = shard_range(len(todo), index, count)
    runs: list[range] = []
    for k in todo[lo:hi]:
        if runs and runs[-1].stop == k:
            runs[-1] = range(runs[-1].start, k + 1)
        else:
            runs.append(range(k, k + 1))
    return runs
