"""What the explorer's pages and JSON API answer, computed once for both: features, search, the
prompt heat-map, neighbours, co-firing and explanations, over every SAE of a catalog.

Errors are `NotFound` (an unknown SAE or latent: 404) and `InputError` (a request that cannot be
served as sent: 422); the app turns them into responses.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from typing import Any

import torch

from gemmascope.evaluate.explanations import store_user_explanation
from gemmascope.explore.catalog import Catalog, Entry
from gemmascope.explore.indexdb import feature_id_query
from gemmascope.explore.live import InputError, Live, Unavailable

NEIGHBOURS = 8
"""Most similar latents listed within the SAE; 3 are listed per other SAE."""
SEARCH_LIMIT = 10
"""Latents per kind of search result."""
MAX_PROMPT_SAES = 256
"""Most SAEs one prompt heat-map reads (a 270M suite has 108)."""


class NotFound(LookupError):
    """An SAE or latent this explorer does not have; the message says what it does have."""


class Explorer:
    """The catalog of SAEs and the models behind them, answering what pages and the API ask."""

    def __init__(self, catalog: Catalog, live: Live) -> None:
        self.catalog, self.live = catalog, live
        self._densities: dict[str, list[float]] = {}

    def densities(self, entry: Entry) -> list[float]:
        """Every latent's firing density (read once: an index does not change them)."""
        if entry.key not in self._densities:
            self._densities[entry.key] = entry.db.densities()
        return self._densities[entry.key]

    # ------------------------------------------------------------ lookups
    def entry(self, key: str) -> Entry:
        found = self.catalog.get(key)
        if found is None:
            names = ", ".join(list(self.catalog.entries)[:5])
            more = f" and {len(self.catalog) - 5} more" if len(self.catalog) > 5 else ""
            raise NotFound(f"there is no SAE {key[:100]!r} here; this explorer has {names}{more}")
        return found

    def feature(self, entry: Entry, fid: int) -> dict[str, Any]:
        found = entry.db.feature(fid) if 0 <= fid < entry.db.n_features else None
        if found is None:
            raise NotFound(f"feature {fid} does not exist; this SAE has features "
                           f"0..{entry.db.n_features - 1}")  # fmt: skip
        return found

    def check_query(self, entry: Entry, q: str) -> str:
        """A search naming a feature id beyond this SAE is refused with its range."""
        fid = feature_id_query(q)
        if fid is not None and fid >= entry.db.n_features:
            raise InputError(f"q: there is no feature {fid}; this SAE has features "
                             f"0..{entry.db.n_features - 1}")  # fmt: skip
        return q

    def latents(
        self, entry: Entry, ids: list[int], **extra: dict[int, Any]
    ) -> list[dict[str, Any]]:
        """Each id as lists show it: density, max activation, logit-lens tokens, explanation, and
        the per-id values in `extra` (e.g. `cos={id: value}`)."""
        summary = entry.db.summaries(ids, top=5)
        out = []
        for i in ids:
            s = summary.get(i)
            if s is None:
                continue
            item = {"sae": entry.key, "id": i, "density": s["density"], "max_act": s["max_act"],
                    "lens_top": s["lens_top"], "explanation": s["explanation"]}  # fmt: skip
            out.append(item | {k: v[i] for k, v in extra.items() if i in v})
        return out

    # ------------------------------------------------------------ search
    def search(self, q: str) -> dict[str, Any]:
        """Latents for a query, three ways: explanations holding its words (full text), logit-lens
        tokens holding it, and, as Neuronpedia's search by inference, the latents that fire most on
        the query itself, relative to their largest activation in the index."""
        q = q.strip()
        if not q:
            return {"query": q, "explanations": [], "lens": [], "fires": []}
        explained, lens = [], []
        for e in self.catalog:
            ids = e.db.search_explanations(q, SEARCH_LIMIT)
            explained += [x | {"label": e.label} for x in self.latents(e, ids)]
            if feature_id_query(q) is None:
                _, found = e.db.list_features(sort="max_act", per_page=3, query=q)
                lens += [x | {"label": e.label} for x in self.latents(e, [f["id"] for f in found])]
        try:
            fired, note = self._fired_by(q), None
        except (InputError, Unavailable) as err:  # the other two kinds still answer
            fired, note = [], str(err)
        return {"query": q, "explanations": explained[: 3 * SEARCH_LIMIT],
                "lens": sorted(lens, key=lambda x: -x["max_act"])[:SEARCH_LIMIT], "fires": fired,
                "fires_error": note}  # fmt: skip

    def _fired_by(self, text: str) -> list[dict[str, Any]]:
        entries = self._of_model()
        result = self.live.fires(text, entries, top=3, features=5)
        scored: list[tuple[float, Entry, int, float]] = []
        for e, sae in zip(entries, result["saes"], strict=True):
            maxima = {i: s["max_act"] for i, s in e.db.summaries(
                [f["id"] for f in sae["features"]], top=0).items()}  # fmt: skip
            for f in sae["features"]:
                if maxima.get(f["id"], 0) > 0:
                    scored.append((f["max_act"] / maxima[f["id"]], e, f["id"], f["max_act"]))
        scored.sort(key=lambda s: -s[0])
        return [self.latents(e, [i], frac={i: frac}, act={i: act})[0] | {"label": e.label}
                for frac, e, i, act in scored[:SEARCH_LIMIT]]  # fmt: skip

    def _of_model(self) -> list[Entry]:
        """The SAEs of the catalog's first model (prompts run one model)."""
        first = next(iter(self.catalog)).model
        return [e for e in self.catalog if e.model == first][:MAX_PROMPT_SAES]

    # ------------------------------------------------------------ the prompt heat-map
    def prompt(self, text: str, sites: list[str] | None = None, width: int | None = None,
               l0: float | None = None, top: int = 3) -> dict[str, Any]:  # fmt: skip
        """Per token, the top latents of one SAE per (site, layer) of the catalog's first model:
        the one of `width` (default the narrowest) whose L0 is nearest `l0`. Each cell's `frac` is
        the top latent's activation over its largest in the index (the heat)."""
        rows = self.pick(sites, width, l0)
        result = self.live.fires(text, rows, top=top, features=0)
        out = []
        for e, sae in zip(rows, result["saes"], strict=True):
            ids = list({x["id"] for cell in sae["latents"] for x in cell})
            maxima = {i: s["max_act"] for i, s in e.db.summaries(ids, top=0).items()}
            cells = [[{"id": x["id"], "act": x["act"],
                       "frac": min(x["act"] / maxima[x["id"]], 1.0) if maxima.get(x["id"]) else 1.0}
                      for x in cell] for cell in sae["latents"]]  # fmt: skip
            out.append(e.summary() | {"label": e.label, "cells": cells})
        return {"tokens": result["tokens"], "rows": out}

    def pick(self, sites: list[str] | None, width: int | None, l0: float | None) -> list[Entry]:
        """One SAE per (site, layer) of the first model, as `prompt` describes."""
        entries = self._of_model()
        known, widths = sorted({e.site for e in entries}), sorted({e.width for e in entries})
        if sites is not None and (not sites or set(sites) - set(known)):
            raise InputError(f"sites: choose one or more of {known}, got {sites}")
        if width is not None and width not in widths:
            raise InputError(f"width: these SAEs have widths {widths}, not {width}")
        sites, width = sites or known, width or widths[0]
        rows = []
        for site in sites:
            for layer in sorted({e.layer for e in entries if e.site == site}):
                same = [e for e in entries if e.site == site and e.layer == layer]
                pool = [e for e in same if e.width == width] or same
                rows.append(min(pool, key=lambda e: 0 if l0 is None else abs((e.l0 or 0) - l0)))
        return rows

    # ------------------------------------------------------------ neighbours and co-firing
    def neighbours(self, entry: Entry, fid: int) -> dict[str, Any]:
        """Latents whose decoder directions are nearest this one's (cosine): within its SAE, in the
        other widths and L0s of its site (feature splitting), and at the layers before and after."""
        self.feature(entry, fid)
        unit = self.live.units(entry)[fid]  # (d_in,)

        def nearest(other: Entry, k: int, skip: int | None = None) -> list[dict[str, Any]]:
            u = self.live.units(other)
            if u.shape[1] != unit.shape[0]:
                return []
            cos = u @ unit  # (m,)
            if skip is not None:
                cos[skip] = -2.0
            best = cos.topk(min(k, len(cos) - (skip is not None)))
            ids = best.indices.tolist()
            return self.latents(other, ids, cos=dict(zip(ids, best.values.tolist(), strict=True)))

        def group(other: Entry | None, k: int) -> dict[str, Any] | None:
            if other is None:
                return None
            return other.summary() | {"label": other.label, "latents": nearest(other, k)}

        return {"within": nearest(entry, NEIGHBOURS, skip=fid),
                "other_saes": [group(e, 3) for e in self.catalog.same_site(entry)],
                "previous": group(self.catalog.adjacent(entry, -1), 3),
                "next": group(self.catalog.adjacent(entry, +1), 3)}  # fmt: skip

    def cofiring(self, entry: Entry, fid: int, k: int = 10) -> list[dict[str, Any]]:
        """The latents of the same SAE that fire together with this one at the peak token of its
        top contexts (each window run again after a BOS), most often first."""
        f = self.feature(entry, fid)
        contexts = f["top_contexts"]
        if not contexts:
            return []
        zs = self.live.on_windows(entry, [[t["id"] for t in c["tokens"]] for c in contexts])
        counts: Counter[int] = Counter()
        total: dict[int, float] = {}
        for c, z in zip(contexts, zs, strict=True):
            row = z[c["peak"]]  # (m,)
            for i in torch.nonzero(row > 0).flatten().tolist():
                if i != fid:
                    counts[i] += 1
                    total[i] = total.get(i, 0.0) + float(row[i])
        ids = [i for i, _ in sorted(counts.items(), key=lambda x: (-x[1], -total[x[0]]))[:k]]
        return self.latents(entry, ids, together={i: counts[i] for i in ids},
                            of={i: len(contexts) for i in ids})  # fmt: skip

    # ------------------------------------------------------------ explanations
    def set_explanation(self, entry: Entry, fid: int, text: str) -> dict[str, Any] | None:
        """Store a user's explanation of a latent (empty: remove it); the latent's explanation now."""
        self.feature(entry, fid)
        try:
            store_user_explanation(entry.db.path, fid, text)
        except sqlite3.Error as err:
            raise Unavailable(f"cannot write to the index {entry.db.path.name} ({err}); is it "
                              "read-only? copy it somewhere writable to edit explanations") from None  # fmt: skip
        return entry.db.feature(fid)["explanation"]  # type: ignore[index]
