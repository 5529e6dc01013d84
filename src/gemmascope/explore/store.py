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
    vocab(id INTEGER PRIMARY KEY, text TEXT)          the decoded string of every token used above
    lens_tokens(token INTEGER, feature INTEGER, rank INTEGER)   top logit-lens tokens, for search

Auto-interpretation may add an `explanations` table (see `gemmascope.evaluate.explanations`).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gemmascope.common.files import atomic_file
from gemmascope.evaluate.explanations import explanations
from gemmascope.evaluate.feature_stats import FeatureStats
from gemmascope.explore.lens import LogitLens

FORMAT = "gemmascope-index"
FORMAT_VERSION = 1
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
CREATE TABLE vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
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
    decode: Callable[[list[int]], list[str]],
    context_size: int,
) -> None:
    """Write the whole index atomically (a temp file renamed onto `path`).

    Args:
        path: the `.sqlite` file to write.
        meta: run description; stored key by key as JSON.
        stats: the final statistics.
        lens: the logit lens of every latent.
        decode: token ids -> their strings (one string per id).
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
            db.executemany("INSERT INTO vocab VALUES (?, ?)", zip(ids, decode(ids), strict=True))
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


# ---------------------------------------------------------------- reading
Sort = Literal["id", "density", "max_act"]
SORTS: tuple[str, ...] = ("id", "density", "max_act")


def feature_id_query(query: str) -> int | None:
    """The feature id a search names (ASCII digits, optionally after `#`), or None for a text search."""
    match = re.fullmatch(r"#?([0-9]+)", query.strip())
    return int(match[1]) if match else None


class IndexDB:
    """Read-only access to an index file; one short-lived connection per call, so threads are safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no such index file; build one with `gemmascope index`"
            )
        try:
            rows = self._query("SELECT key, value FROM meta")
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a gemmascope index ({err})") from None
        self.meta: dict[str, Any] = {k: json.loads(v) for k, v in rows}
        if self.meta.get("format") != FORMAT:
            raise ValueError(
                f"{self.path}: not a gemmascope index (format {self.meta.get('format')!r})"
            )
        self.n_features = int(self._query("SELECT count(*) FROM features")[0][0])

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement on its own connection."""
        with closing(self._connect()) as db:
            return db.execute(sql, args).fetchall()

    def token_texts(self, ids: list[int]) -> dict[int, str]:
        """Strings of the given token ids (those the index stored)."""
        with closing(self._connect()) as db:
            return _token_texts(db, ids)

    def summaries(self, ids: list[int], top: int = 5) -> dict[int, dict[str, Any]]:
        """Density, max activation and the first `top` logit-lens token strings of each known id.

        One connection and two small queries (no contexts are read); unknown ids are left out.
        """
        unique = [i for i in dict.fromkeys(ids) if i in SQLITE_INTS]
        if not unique:
            return {}
        with closing(self._connect()) as db:
            rows = db.execute(
                f"SELECT id, density, max_act, logit_lens FROM features WHERE id IN ({_marks(unique)})",
                tuple(unique),
            ).fetchall()
            lens_top = {fid: [t for t, _ in json.loads(lens_json)["top"][:top]]
                        for fid, _, _, lens_json in rows}  # fmt: skip
            texts = _token_texts(db, [t for tokens in lens_top.values() for t in tokens])
        return {fid: {"density": density, "max_act": max_act,
                      "lens_top": [texts.get(t, "") for t in lens_top[fid]]}
                for fid, density, max_act, _ in rows}  # fmt: skip

    def list_features(
        self,
        *,
        sort: Sort = "density",
        descending: bool = True,
        page: int = 1,
        per_page: int = 50,
        query: str = "",
    ) -> tuple[int, list[dict[str, Any]]]:
        """One page of features and the number of matches.

        `query` is a feature id (ASCII digits, optionally after `#`; one beyond SQLite's integers
        matches nothing) or text: the features whose top logit-lens tokens contain it (case-insensitive,
        surrounding spaces ignored).
        """
        if sort not in SORTS:
            raise ValueError(f"unknown sort {sort!r}; choose one of {list(SORTS)}")
        where, args = "", ()
        q = query.strip()
        fid = feature_id_query(q)
        if fid is not None:
            where, args = ("WHERE id = ?", (fid,)) if fid in SQLITE_INTS else ("WHERE 0", ())
        elif q:
            like = (
                "%" + q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            )
            where = ("WHERE id IN (SELECT feature FROM lens_tokens JOIN vocab ON vocab.id = token "
                     "WHERE lower(trim(vocab.text)) LIKE ? ESCAPE '\\')")  # fmt: skip
            args = (like,)
        direction = "DESC" if descending else "ASC"
        with closing(self._connect()) as db:
            total = int(db.execute(f"SELECT count(*) FROM features {where}", args).fetchone()[0])
            rows = db.execute(
                f"SELECT id, density, max_act, logit_lens FROM features {where} "
                f"ORDER BY {sort} {direction}, id LIMIT ? OFFSET ?",
                (*args, per_page, (page - 1) * per_page),
            ).fetchall()
            snippets = _snippets(db, [r[0] for r in rows])
            out = []
            for fid, density, max_act, lens_json in rows:
                top = [t for t, _ in json.loads(lens_json)["top"][:6]]
                out.append({"id": fid, "density": density, "max_act": max_act, "lens_top": top,
                            "snippet": snippets.get(fid)})  # fmt: skip
            ids = [t for f in out for t in f["lens_top"]]
            ids += [t["id"] for f in out if f["snippet"] for t in f["snippet"]["tokens"]]
            texts = _token_texts(db, ids)
        for f in out:
            f["lens_top"] = [texts.get(t, "") for t in f["lens_top"]]
            for t in f["snippet"]["tokens"] if f["snippet"] else []:
                t["text"] = texts.get(t["id"], "")
        return total, out

    def feature(self, fid: int) -> dict[str, Any] | None:
        """Everything stored about one feature, token ids resolved to strings; None if unknown."""
        if fid not in SQLITE_INTS:
            return None
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT density, max_act, fired, histogram, logit_lens FROM features WHERE id = ?",
                (fid,),
            ).fetchone()
            if row is None:
                return None
            density, max_act, fired, hist_json, lens_json = row
            lens, hist = json.loads(lens_json), json.loads(hist_json)
            contexts = db.execute(
                "SELECT kind, band, rank, value, peak, sequence, position, tokens, acts "
                "FROM contexts WHERE feature = ? ORDER BY kind DESC, band, value DESC, rank",
                (fid,),
            ).fetchall()
            parsed = [(*c[:7], json.loads(c[7]), json.loads(c[8])) for c in contexts]
            explanation = explanations(db, [fid]).get(fid)
            ids = [t for c in parsed for t in c[7]] + [t for side in lens.values() for t, _ in side]
            texts = _token_texts(db, ids)

        def ctx(c: tuple[Any, ...]) -> dict[str, Any]:
            return {"value": c[3], "peak": c[4], "sequence": c[5], "position": c[6],
                    "tokens": [{"id": t, "text": texts.get(t, "")} for t in c[7]], "acts": c[8]}  # fmt: skip

        n_bands = int(self.meta.get("bands", 0))
        bands = []
        for b in range(n_bands):
            upper = hist["hi"] / 2**b
            lower = upper / 2 if b < n_bands - 1 else 0.0
            samples = [ctx(c) for c in parsed if c[0] == "band" and c[1] == b]
            bands.append({"band": b, "lower": lower, "upper": upper, "contexts": samples})
        return {
            "id": fid,
            "density": density,
            "max_act": max_act,
            "fired": fired,
            "histogram": {"hi": hist["hi"], "counts": hist["counts"]},
            "logit_lens": {
                side: [{"id": t, "text": texts.get(t, ""), "value": v} for t, v in items]
                for side, items in lens.items()
            },  # fmt: skip
            "explanation": explanation,
            "top_contexts": [ctx(c) for c in parsed if c[0] == "top"],
            "bands": bands if hist["hi"] > 0 else [],
        }


def _marks(values: list[Any]) -> str:
    """`?, ?, ...`: one bound parameter per value, for `IN (...)`."""
    return ",".join("?" * len(values))


def _token_texts(db: sqlite3.Connection, ids: list[int]) -> dict[int, str]:
    unique = list(set(ids))
    if not unique:
        return {}
    return dict(
        db.execute(f"SELECT id, text FROM vocab WHERE id IN ({_marks(unique)})", tuple(unique))
    )


def _snippets(db: sqlite3.Connection, ids: list[int], radius: int = 6) -> dict[int, dict[str, Any]]:
    """The top context of each feature, cut to `radius` tokens around its peak."""
    if not ids:
        return {}
    rows = db.execute(
        f"SELECT feature, peak, tokens, acts FROM contexts WHERE kind = 'top' AND rank = 0 "
        f"AND feature IN ({_marks(ids)})",
        tuple(ids),
    ).fetchall()
    out = {}
    for fid, peak, tokens_json, acts_json in rows:
        lo = max(peak - radius, 0)
        tokens, acts = json.loads(tokens_json)[lo : peak + radius + 1], json.loads(acts_json)
        out[fid] = {"tokens": [{"id": t} for t in tokens], "peak": peak - lo,
                    "acts": acts[lo : peak + radius + 1]}  # fmt: skip
    return out
