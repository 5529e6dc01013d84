"""Reading a feature index (schema in `store`): `IndexDB`, what the explorer and the exports use.

Contexts come back with each token's text as it reads in its window: characters split over several
tokens are stitched from the bytes the index keeps (`tokens.stitch`).
"""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Literal

from gemmascope.corpus.tokens import stitch
from gemmascope.evaluate.explanations import explanations, search_explanations
from gemmascope.explore.store import FORMAT, SQLITE_INTS

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
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        # SQLite's lower() and LIKE fold ASCII only; a search for "école" must find "École"
        db.create_function("casefold", 1, _casefold, deterministic=True)
        return db

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement on its own connection."""
        with closing(self._connect()) as db:
            return db.execute(sql, args).fetchall()

    def _special(self) -> set[int]:
        """BOS, EOS and padding: not text, so contexts are stitched around them (`tokens.stitch`)."""
        return set(self.meta.get("special_ids", []))

    def token_texts(self, ids: list[int]) -> dict[int, str]:
        """Strings of the given token ids (those the index stored)."""
        with closing(self._connect()) as db:
            return _token_texts(db, ids)

    def summaries(self, ids: list[int], top: int = 5) -> dict[int, dict[str, Any]]:
        """Density, max activation, the first `top` logit-lens token strings and the explanation's
        text (or None) of each known id.

        One connection and a few small queries (no contexts are read); unknown ids are left out.
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
            explained = explanations(db, [r[0] for r in rows])
        return {fid: {"density": density, "max_act": max_act,
                      "lens_top": [texts.get(t, "") for t in lens_top[fid]],
                      "explanation": explained[fid]["text"] if fid in explained else None}
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
                "%"
                + q.casefold().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                + "%"
            )
            where = ("WHERE id IN (SELECT feature FROM lens_tokens JOIN vocab ON vocab.id = token "
                     "WHERE casefold(trim(vocab.text)) LIKE ? ESCAPE '\\')")  # fmt: skip
            args = (like,)
        direction = "DESC" if descending else "ASC"
        with closing(self._connect()) as db:
            total = int(db.execute(f"SELECT count(*) FROM features {where}", args).fetchone()[0])
            rows = db.execute(
                f"SELECT id, density, max_act, logit_lens FROM features {where} "
                f"ORDER BY {sort} {direction}, id LIMIT ? OFFSET ?",
                (*args, per_page, (page - 1) * per_page),
            ).fetchall()
            snippets = _snippets(db, [r[0] for r in rows], self._special())
            out = []
            for fid, density, max_act, lens_json in rows:
                top = [t for t, _ in json.loads(lens_json)["top"][:6]]
                out.append({"id": fid, "density": density, "max_act": max_act, "lens_top": top,
                            "snippet": snippets.get(fid)})  # fmt: skip
            texts = _token_texts(db, [t for f in out for t in f["lens_top"]])
        for f in out:
            f["lens_top"] = [texts.get(t, "") for t in f["lens_top"]]
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
            pieces = _token_bytes(db, [t for c in parsed for t in c[7]])
            texts = _token_texts(db, [t for side in lens.values() for t, _ in side])
        special = self._special()

        def ctx(c: tuple[Any, ...]) -> dict[str, Any]:
            return {"value": c[3], "peak": c[4], "sequence": c[5], "position": c[6],
                    "tokens": _stitched(c[7], pieces, special), "acts": c[8]}  # fmt: skip

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

    def search_explanations(self, query: str, limit: int = 10) -> list[int]:
        """Latents whose explanation holds the words of `query` (full text), best first."""
        with closing(self._connect()) as db:
            return search_explanations(db, query, limit)

    def densities(self) -> list[float]:
        """Every latent's firing density, by id (the SAE page's histogram)."""
        return [r[0] for r in self._query("SELECT density FROM features ORDER BY id")]


def _casefold(text: Any) -> Any:
    return text.casefold() if isinstance(text, str) else text


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


def _token_bytes(db: sqlite3.Connection, ids: list[int]) -> dict[int, bytes]:
    """Each id's bytes in a text; a version-1 file (no `bytes` column) gives its stored text's UTF-8."""
    unique = list(set(ids))
    if not unique:
        return {}
    has_bytes = any(col[1] == "bytes" for col in db.execute("PRAGMA table_info(vocab)"))
    rows = db.execute(
        f"SELECT id, {'bytes' if has_bytes else 'NULL'}, text FROM vocab "
        f"WHERE id IN ({_marks(unique)})",
        tuple(unique),
    )
    return {i: text.encode() if b is None else bytes(b) for i, b, text in rows}


def _stitched(
    tokens: list[int], pieces: dict[int, bytes], special: set[int]
) -> list[dict[str, Any]]:
    """A window's tokens as `{"id", "text"}`, texts stitched from their bytes (`tokens.stitch`)."""
    texts = stitch([pieces.get(t, b"") for t in tokens], [t in special for t in tokens])
    return [{"id": t, "text": text} for t, text in zip(tokens, texts, strict=True)]


def _snippets(
    db: sqlite3.Connection, ids: list[int], special: set[int], radius: int = 6
) -> dict[int, dict[str, Any]]:
    """The top context of each feature, cut to `radius` tokens around its peak."""
    if not ids:
        return {}
    rows = db.execute(
        f"SELECT feature, peak, tokens, acts FROM contexts WHERE kind = 'top' AND rank = 0 "
        f"AND feature IN ({_marks(ids)})",
        tuple(ids),
    ).fetchall()
    parsed = [(fid, peak, json.loads(tokens), json.loads(acts)) for fid, peak, tokens, acts in rows]
    pieces = _token_bytes(db, [t for _, _, tokens, _ in parsed for t in tokens])
    out = {}
    for fid, peak, tokens, acts in parsed:
        lo, hi = max(peak - radius, 0), peak + radius + 1
        # stitched over the whole stored window, then cut: a character begun before the cut still shows
        out[fid] = {"tokens": _stitched(tokens, pieces, special)[lo:hi], "peak": peak - lo,
                    "acts": acts[lo:hi]}  # fmt: skip
    return out
