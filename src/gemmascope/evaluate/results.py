"""Evaluation results on disk, and the SAE sources an evaluation names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gemmascope.common.files import read_versioned, write_json

RESULTS_FORMAT = "gemmascope-eval"


RESULTS_VERSION = 1


# ---------------------------------------------------------------- sources and result files
def expand_sources(
    sources: Sequence[str], sae_ids: Sequence[str] = ()
) -> list[tuple[str, str | None]]:
    """(source, sae_id) pairs to load: each `sae_id` of each source, or every SAE of a local folder.

    A hub repo holding several SAEs needs `sae_ids` (downloading a whole Gemma Scope repo is never
    what one wants).
    """
    from gemmascope.io import list_sae_ids

    pairs: list[tuple[str, str | None]] = []
    for source in sources:
        if sae_ids:
            pairs += [(source, sae_id) for sae_id in sae_ids]
            continue
        path = Path(source)
        if path.is_file():
            pairs.append((source, None))
            continue
        ids = list_sae_ids(source)
        if len(ids) > 1 and not path.is_dir():
            raise ValueError(
                f"{source}: the repo holds {len(ids)} SAEs; pick some with --sae-id, e.g. {ids[:3]}"
            )
        pairs += [(source, None if sae_id == "." else sae_id) for sae_id in ids]
    return pairs


def write_results(
    path: str | Path, records: list[dict[str, Any]], settings: dict[str, Any]
) -> None:
    """Write evaluation records atomically as `{"format", "format_version", "settings", "results"}`."""
    from gemmascope import __version__

    write_json(path, {"format": RESULTS_FORMAT, "format_version": RESULTS_VERSION,
                      "gemmascope_version": __version__, "settings": settings, "results": records})  # fmt: skip


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The records of a file written by `write_results` (`gemmascope eval --out`)."""
    data = read_versioned(
        path, RESULTS_FORMAT, RESULTS_VERSION,
        fix="not a gemmascope evaluation file; write one with `gemmascope eval ... --out FILE`",
        missing="write one with `gemmascope eval ... --out FILE`",
    )  # fmt: skip
    if not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: not a gemmascope evaluation file (it has no `results` list)")
    return data["results"]


def site_label(r: dict[str, Any]) -> str:
    """Where a record's SAE reads, and for a transcoder where it writes: `mlp_in->mlp_out+skip`
    (`... CLT` for a layer of a cross-layer transcoder)."""
    site = str(r.get("site"))
    if r.get("target_site"):
        site += f"->{r['target_site']}" + ("+skip" if r.get("skip_connection") else "")
    return site + (" CLT" if r.get("cross_layer") else "")


def results_table(records: list[dict[str, Any]], *, title: str) -> Any:
    """Evaluation records as a terminal table, one row per SAE."""
    from rich.table import Table

    table = Table("sae", "layer", "site", "width", "L0", "FVU", "dLM loss", "recovered", "dead",
                  title=title)  # fmt: skip
    for r in records:
        rec = r["frac_recovered"]
        table.add_row(
            f"{r['source']}" + (f" [{r['sae_id']}]" if r["sae_id"] else ""), str(r["layer"]),
            site_label(r), str(r["width"]), f"{r['l0']:.1f}", f"{r['fvu']:.4f}",
            f"{r['delta_lm_loss']:.4f}", "-" if rec is None else f"{rec:.3f}", str(r["dead"]),
        )  # fmt: skip
    return table
