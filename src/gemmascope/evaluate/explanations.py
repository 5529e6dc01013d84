"""Latent explanations in a feature index: written by auto-interpretation (`gemmascope eval
--evals autointerp --index FILE`), read by the explorer. One table beside the index's own:

    explanations(feature INTEGER PRIMARY KEY, text TEXT, detection REAL, fuzzing REAL,
                 explainer TEXT)   -- scores are balanced accuracies (NULL: the answer did not parse)

Written in one SQLite transaction, so a reader sees all of a run's explanations or none.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

TABLE = """CREATE TABLE IF NOT EXISTS explanations (
    feature INTEGER PRIMARY KEY, text TEXT NOT NULL, detection REAL, fuzzing REAL,
    explainer TEXT NOT NULL)"""


def check_index(path: str | Path, sae: Any) -> None:
    """Refuse an index that was not built of this SAE (its weights' digest)."""
    try:
        with closing(sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)) as db:
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    except sqlite3.Error as err:
        raise ValueError(f"{path}: not a feature index ({err}); build one with `gemmascope "
                         "index`") from None  # fmt: skip
    if meta.get("sae_sha256") != sae.sha256():
        raise ValueError(
            f"{path} indexes another SAE (layer {meta.get('layer')} {meta.get('site')}, "
            f"{meta.get('d_sae', 0):,} latents, other weights) than the one evaluated; name the "
            "index `gemmascope index` built of this SAE"
        )


def store_explanations(path: str | Path, details: list[dict[str, Any]], explainer: str) -> int:
    """Store the explanations of auto-interpretation's `details`, replacing what its latents had
    (an empty explanation leaves none); how many were stored."""
    rows = [(d["latent"], d["explanation"], d["detection"], d["fuzzing"], explainer)
            for d in details if d["explanation"]]  # fmt: skip
    with closing(sqlite3.connect(path, timeout=60)) as db, db:
        db.execute(TABLE)
        db.executemany(
            "DELETE FROM explanations WHERE feature = ?", [(d["latent"],) for d in details]
        )
        db.executemany("INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?, ?)", rows)
    return len(rows)


def explanations(db: sqlite3.Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    """The stored explanation of each of `ids` that has one (none in an index without the table)."""
    if (
        not ids
        or not db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'explanations'"
        ).fetchone()
    ):
        return {}
    marks = ",".join("?" * len(ids))
    rows = db.execute(f"SELECT feature, text, detection, fuzzing, explainer FROM explanations "
                      f"WHERE feature IN ({marks})", tuple(ids))  # fmt: skip
    return {f: {"text": t, "detection": d, "fuzzing": z, "explainer": e} for f, t, d, z, e in rows}
