"""Latent explanations in a feature index: written by auto-interpretation (`gemmascope eval
--evals autointerp --index FILE`), read by the explorer. One table beside the index's own:

    explanations(feature INTEGER PRIMARY KEY, text TEXT, detection REAL, fuzzing REAL,
                 explainer TEXT)   -- scores are balanced accuracies (NULL: the answer did not parse)
    user_explanations(feature INTEGER PRIMARY KEY, text TEXT, updated REAL)
                                   -- written in the explorer's feature page; shown first
    explanation_search             -- FTS5 over both texts (feature, kind UNINDEXED)

A user's explanation lives beside the explainer's, so neither writer replaces what the other wrote.
Each write is one SQLite transaction, so a reader sees all of a run's explanations or none.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

TABLES = """
CREATE TABLE IF NOT EXISTS explanations (
    feature INTEGER PRIMARY KEY, text TEXT NOT NULL, detection REAL, fuzzing REAL,
    explainer TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS user_explanations (
    feature INTEGER PRIMARY KEY, text TEXT NOT NULL, updated REAL NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS explanation_search USING fts5(
    text, feature UNINDEXED, kind UNINDEXED, tokenize = 'unicode61 remove_diacritics 2');
"""
MAX_CHARS = 1000
"""Longest explanation a user may write."""


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
    latents = [(d["latent"],) for d in details]
    with closing(_open(path)) as db, db:
        db.executescript(TABLES)
        _reindex(db)
        db.executemany("DELETE FROM explanations WHERE feature = ?", latents)
        db.executemany(
            "DELETE FROM explanation_search WHERE feature = ? AND kind = 'auto'", latents
        )
        db.executemany("INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?, ?)", rows)
        db.executemany("INSERT INTO explanation_search VALUES (?, ?, 'auto')",
                       [(r[1], r[0]) for r in rows])  # fmt: skip
    return len(rows)


def store_user_explanation(path: str | Path, feature: int, text: str) -> None:
    """Store (or, for empty `text`, remove) a user's explanation of one latent."""
    text = text.strip()
    if len(text) > MAX_CHARS:
        raise ValueError(
            f"an explanation is at most {MAX_CHARS} characters; this one is {len(text)}"
        )
    with closing(_open(path)) as db, db:
        db.executescript(TABLES)
        _reindex(db)
        db.execute("DELETE FROM user_explanations WHERE feature = ?", (feature,))
        db.execute("DELETE FROM explanation_search WHERE feature = ? AND kind = 'user'", (feature,))
        if text:
            db.execute(
                "INSERT INTO user_explanations VALUES (?, ?, ?)", (feature, text, time.time())
            )
            db.execute("INSERT INTO explanation_search VALUES (?, ?, 'user')", (text, feature))


def _open(path: str | Path) -> sqlite3.Connection:
    """The index for writing; never creates one (a missing index is an error, not a new file)."""
    try:
        return sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=rw", uri=True, timeout=60)
    except sqlite3.OperationalError as err:
        raise FileNotFoundError(f"{path}: cannot open the feature index to write explanations "
                                f"({err}); build it with `gemmascope index`") from None  # fmt: skip


def _reindex(db: sqlite3.Connection) -> None:
    """Fill the search table from explanations stored before it existed (once: it stays in step)."""
    if db.execute("SELECT 1 FROM explanation_search LIMIT 1").fetchone() is None:
        db.execute("INSERT INTO explanation_search SELECT text, feature, 'auto' FROM explanations")
        db.execute("INSERT INTO explanation_search SELECT text, feature, 'user' "
                   "FROM user_explanations")  # fmt: skip


def search_explanations(db: sqlite3.Connection, query: str, limit: int = 20) -> list[int]:
    """Latents whose explanation holds every word of `query` (the last one as a prefix), best
    match first; none in an index without explanations."""
    words = re.findall(r"\w+", query)
    if not words or not _has(db, "explanation_search"):
        return []
    match = " ".join(f'"{w}"' for w in words[:-1]) + f' "{words[-1]}"*'
    rows = db.execute("SELECT feature FROM explanation_search WHERE explanation_search MATCH ? "
                      "ORDER BY rank LIMIT ?", (match.strip(), limit * 2)).fetchall()  # fmt: skip
    return list(dict.fromkeys(int(r[0]) for r in rows))[:limit]


def _has(db: sqlite3.Connection, table: str) -> bool:
    return bool(db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone())


def explanations(db: sqlite3.Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    """The explanation of each of `ids` that has one: `text` (the user's if written, else the
    explainer's), `user` (the user's or None), `auto` (the explainer's text, `detection`, `fuzzing`
    and `explainer`, or None)."""
    if not ids or not _has(db, "explanations"):
        return {}
    marks = ",".join("?" * len(ids))
    auto = {f: {"text": t, "detection": d, "fuzzing": z, "explainer": e}
            for f, t, d, z, e in db.execute(
                f"SELECT feature, text, detection, fuzzing, explainer FROM explanations "
                f"WHERE feature IN ({marks})", tuple(ids))}  # fmt: skip
    user: dict[int, str] = {}
    if _has(db, "user_explanations"):
        user = dict(db.execute(f"SELECT feature, text FROM user_explanations "
                               f"WHERE feature IN ({marks})", tuple(ids)))  # fmt: skip
    return {f: {"text": user.get(f) or auto[f]["text"], "user": user.get(f), "auto": auto.get(f)}
            for f in ids if f in auto or f in user}  # fmt: skip
