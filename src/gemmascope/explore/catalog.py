"""The SAEs one explorer serves: every feature index of a suite, of a folder, or the files given.

A suite (`gemmascope suite OUT`) keeps the index of each SAE at `OUT/index/L03.resid_post/NAME.sqlite`
(`suite_index`) and its evaluation in `OUT/results.json` (or `OUT/results/L03.json` per layer while
it runs); any other folder is searched for index files, and a `results.json` beside them is read
too. Evaluation records are matched to indexes by the SAE they name, so metrics appear wherever
they were measured. Entries are ordered model -> site -> layer -> width -> L0 and named by a short
URL-safe key that requests use; no request ever names a path.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmascope.explore.indexdb import IndexDB

SUITE_INDEX = "index"
"""The folder of a suite that holds its indexes."""
SHOWN_METRICS = ("l0", "fvu", "delta_lm_loss", "frac_recovered", "dead", "dense")
"""The evaluation's numbers an SAE page shows first (SAEBench's follow)."""


def suite_index(out: Path, sae_id: str) -> Path:
    """Where the suite at `out` keeps the index of SAE `sae_id` (`L03.resid_post/NAME`)."""
    return out / SUITE_INDEX / f"{sae_id}.sqlite"


@dataclass
class Entry:
    """One SAE of the catalog: its index and where it sits in the suite's grid."""

    key: str
    db: IndexDB
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def meta(self) -> dict[str, Any]:
        return self.db.meta

    @property
    def model(self) -> str:
        return str(self.meta.get("model_given") or self.meta.get("model"))

    @property
    def site(self) -> str:
        return str(self.meta["site"])

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])

    @property
    def width(self) -> int:
        return int(self.meta.get("d_sae") or self.db.n_features)

    @property
    def l0(self) -> float | None:
        """The measured L0 where the SAE was evaluated, else its training target."""
        measured = self.metrics.get("l0")
        return float(measured) if measured is not None else self.meta.get("target_l0")

    @property
    def label(self) -> str:
        l0 = f", L0 {self.l0:.0f}" if self.l0 is not None else ""
        return f"layer {self.layer} {self.site}, {self.width:,} latents{l0}"

    def order(self) -> tuple[Any, ...]:
        return (self.model, self.site, self.layer, self.width, self.l0 or 0.0, self.key)

    def summary(self) -> dict[str, Any]:
        """What lists and the JSON API say about the SAE."""
        return {"key": self.key, "model": self.model, "site": self.site, "layer": self.layer,
                "width": self.width, "l0": self.l0, "target_l0": self.meta.get("target_l0"),
                "name": self.meta.get("sae_name"), "metrics": self.metrics}  # fmt: skip


class Catalog:
    """The indexes under `sources` (suite folders, folders or index files), keyed for URLs.

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: a source holds no index, or a file is not one.
    """

    def __init__(self, sources: Sequence[str | Path] | str | Path) -> None:
        if isinstance(sources, str | Path):
            sources = [sources]
        if not sources:
            raise ValueError("nothing to explore: name a suite folder, a folder or index files")
        opened: dict[Path, IndexDB] = {}  # by resolved path: a file named twice is served once
        records: list[dict[str, Any]] = []
        for source in map(Path, sources):
            found, recs = _scan(source)
            opened.update((db.path.resolve(), db) for db in found)
            records += recs
        dbs = list(opened.values())
        by_sae = {_sae_path(r): r for r in records if _sae_path(r) is not None}
        keys = _keys(dbs)
        entries = [Entry(key, db, _metrics(by_sae.get(_resolved(db.meta.get("sae_source")), {})))
                   for key, db in zip(keys, dbs, strict=True)]  # fmt: skip
        self.entries = {e.key: e for e in sorted(entries, key=Entry.order)}

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries.values())

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def tree(self) -> dict[str, dict[str, dict[int, list[Entry]]]]:
        """model -> site -> layer -> entries by width, then L0 (the explorer's navigation)."""
        out: dict[str, dict[str, dict[int, list[Entry]]]] = {}
        for e in self:
            out.setdefault(e.model, {}).setdefault(e.site, {}).setdefault(e.layer, []).append(e)
        return out

    def same_site(self, entry: Entry) -> list[Entry]:
        """The other SAEs reading the same model, site and layer (other widths and L0s)."""
        return [e for e in self if e is not entry and e.model == entry.model
                and e.site == entry.site and e.layer == entry.layer]  # fmt: skip

    def adjacent(self, entry: Entry, step: int) -> Entry | None:
        """The SAE of the same site at the nearest layer after (`step` > 0) or before `entry`'s
        that the catalog has, the one most like `entry` (width, then L0)."""
        layers = {e.layer for e in self if e.model == entry.model and e.site == entry.site}
        ahead = [x for x in layers if (x - entry.layer) * step > 0]
        if not ahead:
            return None
        layer = min(ahead, key=lambda x: abs(x - entry.layer))
        others = [e for e in self if e.model == entry.model and e.site == entry.site
                  and e.layer == layer]  # fmt: skip
        return min(others, key=lambda e: (abs(e.width - entry.width),
                                          abs((e.l0 or 0) - (entry.l0 or 0))))  # fmt: skip


def _scan(source: Path) -> tuple[list[IndexDB], list[dict[str, Any]]]:
    """The indexes and evaluation records of one source (a file given that is not an index is an
    error; one found in a folder is skipped)."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder; name a suite folder (made by "
                                "`gemmascope suite`), a folder of indexes or index files")  # fmt: skip
    if source.is_file():
        return [IndexDB(source)], []
    root = source / SUITE_INDEX if (source / "suite.json").exists() else source
    found = [db for p in sorted(root.rglob("*.sqlite")) if (db := _open_index(p)) is not None]
    if not found:
        raise ValueError(
            f"{source}: holds no feature index; build them with `gemmascope index` (or rerun the "
            "`gemmascope suite` command, whose index stage writes them)"
        )
    return found, _records(source)


def _open_index(path: Path) -> IndexDB | None:
    try:
        return IndexDB(path)
    except (OSError, ValueError):
        return None


def _records(folder: Path) -> list[dict[str, Any]]:
    """Evaluation records kept in `folder`: results.json, else a running suite's results/L*.json."""
    from gemmascope.evaluate import read_results

    files = [folder / "results.json"] if (folder / "results.json").exists() else []
    files = files or sorted((folder / "results").glob("L*.json"))
    out = []
    for f in files:
        try:
            out += read_results(f)
        except (OSError, ValueError):
            continue  # not an evaluation file: the explorer works without metrics
    return out


def _resolved(source: Any) -> Path | None:
    if not source:
        return None
    path = Path(str(source)).expanduser()
    return path.resolve() if path.exists() else None


def _sae_path(record: dict[str, Any]) -> Path | None:
    source, sae_id = record.get("source"), record.get("sae_id")
    return _resolved(Path(str(source)) / sae_id if source and sae_id else source)


def _metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an evaluation record: its own, then SAEBench's by eval (`absorption.mean...`)."""
    out = {k: record[k] for k in SHOWN_METRICS if isinstance(record.get(k), int | float)}
    for name, result in (record.get("saebench") or {}).items():
        for k, v in (result or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{name}.{k}"] = v
    return out


def _keys(dbs: list[IndexDB]) -> list[str]:
    """A short URL-safe name per index: its SAE's name, made unique with the folder above."""
    names = [_slug(str(db.meta.get("sae_name") or db.path.stem)) for db in dbs]
    repeated = {n for n, c in Counter(names).items() if c > 1}
    names = [_slug(f"{db.path.parent.name}.{n}") if n in repeated else n
             for db, n in zip(dbs, names, strict=True)]  # fmt: skip
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}.{seen[name]}"
    return names


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "sae"
