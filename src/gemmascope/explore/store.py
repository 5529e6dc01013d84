"""The feature index on disk: one SQLite file, written once from the final statistics, read by the explorer.

Schema (JSON columns hold compact JSON text):

    meta(key TEXT PRIMARY KEY, value TEXT)            JSON values: model, sae_source, layer, site, ...
    features(id INTEGER PRIMARY KEY, density REAL, max_act REAL, fired INTEGER,
             histogram TEXT,   -- {"hi": upper edge, "counts": [bins]} over [0, hi), non-zero acts only
             logit_lens TEXT)  -- {"top": [[token, logit], ...], "bottom": [[token, logit], ...]}
    contexts(feature INTEGER, kind TEXT, band INTEGER, rank INTEGER, value REAL, peak INTEGER,
             sequence INTEGER, position INTEGER, tokens TEXT, acts TEXT)
             -- kind 'top' (band -1, rank 0 = largest) or 'band' (band 0 = [hi/2, hi), 1 = [hi/4, hi/2),
             -- ...; the last band holds everything lower); tokens/acts: JSON lists of the window,
             -- peak: the index of the activating token in them; sequence/position: where it came from
    vocab(id INTEGER PRIMARY KEY, text TEXT, bytes BLOB)   every token used above: its text alone
             -- (`tokens.token_text`: a lone byte shows as <0xE2>) and its exact bytes in a text
             -- (`tokens.token_bytes`), which contexts are stitched from; version 1 had no `bytes`
    lens_tokens(token INTEGER, feature INTEGER, rank INTEGER)   top logit-lens tokens, for search

Auto-interpretation may add an `explanations` table (see `gemmascope.evaluate.explanations`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemmascope.common.files import atomic_file
from gemmascope.corpus.tokens import token_text
from gemmascope.evaluate.feature_stats import FeatureStats
from gemmascope.explore.lens import LogitLens

FORMAT = "gemmascope-index"
FORMAT_VERSION = 2
"""2: `vocab.bytes`. Version-1 files still read: their stored text stands in for the bytes."""
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    id INTEGER PRIMARY KEY, density REAL NOT NULL, max_act REAL NOT NULL, fired INTEGER NOT NULL,
    histogram TEXT NOT NULL, logit_lens TEXT NOT NULL);
CREATE INDEX features_density ON features (density);
CREATE INDEX features_max_act ON features (max_act);
CREATE TABLE contexts (
    feature INTEGER NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('top', 'band')),
    band INTEGER NOT NULL, rank INTEGER NOT NULL, value REAL NOT NULL, peak INTEGER NOT NULL,
    sequence INTEGER NOT NULL, position INTEGER NOT NULL, tokens TEXT NOT NULL, acts TEXT NOT NULL,
    PRIMARY KEY (feature, kind, band, rank)) WITHOUT ROWID;
CREATE TABLE vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL, bytes BLOB);
CREATE TABLE lens_tokens (
    token INTEGER NOT NULL, feature INTEGER NOT NULL, rank INTEGER NOT NULL,
    PRIMARY KEY (token, feature)) WITHOUT ROWID;
"""
LENS_SEARCH_RANKS = 10
"""How many of a latent's top logit-lens tokens a search by token looks at."""
SQLITE_INTS = range(-(2**63), 2**63)
"""What an SQLite INTEGER holds; binding a Python int outside it raises OverflowError."""


def write_index(
    path: Path,
    meta: dict[str, Any],
    stats: FeatureStats,
    lens: LogitLens,
    decode: Callable[[list[int]], list[bytes]],
    context_size: int,
) -> None:
    """Write the whole index atomically (a temp file renamed onto `path`).

    Args:
        path: the `.sqlite` file to write.
        meta: run description; stored key by key as JSON.
        stats: the final statistics.
        lens: the logit lens of every latent.
        decode: token ids -> the bytes each adds to a text (`feature_stats.token_decoder`).
        context_size: tokens per sequence, to turn stream positions into (sequence, position).
    """
    used: set[int] = set()
    with atomic_file(path) as tmp:
        db = sqlite3.connect(tmp)
        try:
            db.executescript(SCHEMA)
            meta = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION}
            db.executemany("INSERT INTO meta VALUES (?, ?)",
                           [(k, json.dumps(v)) for k, v in meta.items()])  # fmt: skip
            db.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?)",
                           _feature_rows(stats, lens, used))  # fmt: skip
            db.executemany("INSERT INTO lens_tokens VALUES (?, ?, ?)", _lens_rows(lens))
            db.executemany("INSERT INTO contexts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           _context_rows(stats, context_size, used))  # fmt: skip
            ids = sorted(used)
            vocab = [(i, token_text(b), b) for i, b in zip(ids, decode(ids), strict=True)]
            db.executemany("INSERT INTO vocab VALUES (?, ?, ?)", vocab)
            db.commit()
        finally:
            db.close()


def _feature_rows(
    stats: FeatureStats, lens: LogitLens, used: set[int]
) -> Iterator[tuple[Any, ...]]:
    n = max(int(stats.n_tokens), 1)
    fired = stats.fired.tolist()
    max_act = stats.top_val.view(stats.d_sae, -1)[:, 0].tolist()
    hi, hist = stats.hi.tolist(), stats.hist.tolist()
    top_ids, top_vals = lens.top_ids.tolist(), _round(lens.top_values.numpy())
    bot_ids, bot_vals = lens.bottom_ids.tolist(), _round(lens.bottom_values.numpy())
    for i in range(stats.d_sae):
        used.update(top_ids[i])
        used.update(bot_ids[i])
        lens_json = {
            "top": [list(p) for p in zip(top_ids[i], top_vals[i], strict=True)],
            "bottom": [list(p) for p in zip(bot_ids[i], bot_vals[i], strict=True)],
        }
        histogram = {"hi": hi[i], "counts": hist[i]}
        yield (i, fired[i] / n, max_act[i], fired[i], _dumps(histogram), _dumps(lens_json))


def _lens_rows(lens: LogitLens) -> Iterator[tuple[int, int, int]]:
    ids = lens.top_ids[:, :LENS_SEARCH_RANKS].tolist()
    for feature, row in enumerate(ids):
        seen: set[int] = set()
        for rank, token in enumerate(row):
            if token not in seen:
                seen.add(token)
                yield token, feature, rank


def _context_rows(
    stats: FeatureStats, context_size: int, used: set[int]
) -> Iterator[tuple[Any, ...]]:
    k, nb, s = stats.top_k, stats.bands, stats.samples
    top = (stats.top_val, stats.top_loc, stats.top_tok, stats.top_act)
    for slot, value, loc, toks, acts in _slots(*top, occupied=stats.top_val > 0):
        feature, rank = divmod(slot, k)
        yield _context_row(feature, "top", -1, rank, value, loc, toks, acts, context_size, used)
    bands = (stats.band_val, stats.band_loc, stats.band_tok, stats.band_act)
    for slot, value, loc, toks, acts in _slots(*bands, occupied=torch.isfinite(stats.band_key)):
        group, rank = divmod(slot, s)
        feature, band = divmod(group, nb)
        yield _context_row(feature, "band", band, rank, value, loc, toks, acts, context_size, used)


def _slots(
    val: torch.Tensor,
    loc: torch.Tensor,
    tok: torch.Tensor,
    act: torch.Tensor,
    occupied: torch.Tensor,
) -> Iterator[tuple[int, float, int, np.ndarray, np.ndarray]]:
    """Occupied slots in order, with their window trimmed of the -1 padding off the sequence."""
    idx = occupied.nonzero().squeeze(1)
    vals, locs = val[idx].tolist(), loc[idx].tolist()
    toks, acts = tok[idx].cpu().numpy(), act[idx].cpu().numpy()
    for j, slot in enumerate(idx.tolist()):
        yield slot, vals[j], locs[j], toks[j], acts[j]


def _context_row(
    feature: int,
    kind: str,
    band: int,
    rank: int,
    value: float,
    loc: int,
    toks: np.ndarray,
    acts: np.ndarray,
    context_size: int,
    used: set[int],
) -> tuple[Any, ...]:
    inside = toks >= 0
    lo = int(inside.argmax())
    hi = len(toks) - int(inside[::-1].argmax())
    window = len(toks) // 2
    token_list = toks[lo:hi].tolist()
    used.update(token_list)
    sequence, position = divmod(loc, context_size)
    return (feature, kind, band, rank, value, window - lo, sequence, position,
            _dumps(token_list), _dumps(_round(acts[lo:hi])))  # fmt: skip


def _round(x: np.ndarray) -> list[Any]:
    """Four significant digits, to keep the JSON small; zeros stay exact."""
    x = x.astype(np.float64)
    mag = np.where(x == 0, 1.0, 10.0 ** (3 - np.floor(np.log10(np.abs(np.where(x == 0, 1, x))))))
    return (np.round(x * mag) / mag + 0.0).tolist()  # + 0.0 turns -0.0 into 0.0


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
