"""Where an index run keeps its state between chunks, and what already sits at its `out`.

The running statistics are saved to `OUT.partial` (safetensors, atomically) with the run's identity
and the chunks merged; a run started again with the same identity continues from there, any other
is refused. An index already at `OUT` is compared by its meta the same way.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from gemmascope.common.files import atomic_file
from gemmascope.evaluate.feature_stats import FeatureStats
from gemmascope.explore.store import FORMAT as INDEX_FORMAT


def checkpoint_path(out: Path) -> Path:
    """Where a run writing `out` keeps its checkpoint."""
    return out.with_name(out.name + ".partial")


def existing_index(out: Path, overwrite: bool) -> dict[str, Any] | None:
    """The meta of the index already at `out` (None if there is none); refuses, before any
    work, a file there that is not an index unless `overwrite`."""
    if not out.exists():
        return None
    try:
        with contextlib.closing(
            sqlite3.connect(out.resolve().as_uri() + "?mode=ro", uri=True)
        ) as db:
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    except (sqlite3.Error, ValueError):
        meta = {}
    if meta.get("format") == INDEX_FORMAT:
        return meta
    if overwrite:
        return None
    raise FileExistsError(
        f"{out}: exists and is not a gemmascope index; pass --overwrite to replace it, or "
        "choose another --out"
    )


def resume(partial: Path, identity: dict[str, Any], stats: FeatureStats) -> int:
    """Load the checkpoint if there is one for this run; return the chunks it covers."""
    if not partial.exists():
        return 0
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(partial), framework="pt") as f:
        info = f.metadata() or {}
    saved = json.loads(info.get("identity", "null"))
    expected = json.loads(json.dumps(identity))  # as the checkpoint stores it (tuples as lists)
    if saved != expected:
        diff = sorted(k for k in {*identity, *(saved or {})}
                      if (saved or {}).get(k) != expected.get(k))  # fmt: skip
        raise ValueError(
            f"{partial} is the checkpoint of another index run (differs in {diff}); rerun with the "
            "same settings to resume it, or delete it to start afresh"
        )
    stats.load_state_dict(load_file(str(partial)))
    return int(info["chunks_done"])


def save_checkpoint(
    partial: Path, identity: dict[str, Any], stats: FeatureStats, done: int
) -> None:
    from safetensors.torch import save_file

    meta = {"identity": json.dumps(identity), "chunks_done": str(done)}
    with atomic_file(partial) as tmp:
        save_file(
            {k: v.contiguous() for k, v in stats.state_dict().items()}, str(tmp), metadata=meta
        )
