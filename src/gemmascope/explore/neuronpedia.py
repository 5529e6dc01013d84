"""Export a feature index for Neuronpedia: the folder its importer reads, or SAEDashboard's batches.

Neuronpedia (github.com/hijohnnylin/neuronpedia, read at ebb8426, 2026-08) shows a latent from three
tables: `Neuron` (one row per latent), `Activation` (one per example) and `Explanation`. Two layouts
lead there; `layout` picks one.

- `import`: what `apps/webapp/app/api/admin/import/route.ts` reads from `{modelId}/{sourceId}/`:
  `release.jsonl`, `model.jsonl`, `sourceset.jsonl`, `source.jsonl` (one row each), then gzipped
  JSON lines `features/batch-{n}.jsonl.gz` (table `Neuron`), `activations/batch-{n}.jsonl.gz`
  (`Activation`) and `explanations/batch-{n}.jsonl.gz` (`Explanation`). Rows carry the fields of
  `utils/neuronpedia-utils/neuronpedia_utils/db_models/*.py` (columns a table lacks are ignored by
  `apps/webapp/lib/db/import.ts`); `sourceId` is `{layer}-{source_set}`, as
  `convert-saedashboard-to-neuronpedia-export.py` names it, and the rows are built from the
  dashboard features below the way that script does (and SAEDashboard's
  `neuronpedia_export.py`, added after 0.8.0, at commit db4839a), but that `index` is written as
  the text its `String` column holds and `sourceSetName` names the source set.
- `dashboard`: what SAEDashboard's `NeuronpediaRunner` writes (jbloomAus/SAEDashboard 0.8.0,
  `sae_dashboard/neuronpedia/neuronpedia_runner.py` -> `batch-{n}.json`), the input of that
  conversion: `NeuronpediaDashboardBatch.to_dict()` of `neuronpedia_dashboard.py`, i.e.
  `{model_id, layer, sae_set, sae_id_suffix, features}`, each feature `feature_index`, the logit
  lens as `pos_str`/`pos_values` and `neg_str`/`neg_values`, `frac_nonzero` (density),
  `freq_hist_data_bar_values`/`_heights` (bin centres and counts, as `HistogramData.from_data`),
  `n_prompts_total`, `n_tokens_in_prompt`, `dataset` and `activations`, each with `bin_min`,
  `bin_max`, `bin_contains`, `tokens`, `values` and `qualifying_token_index`. This format has no
  place for explanations, so they are not exported in it.

Top contexts form SAEDashboard's "TOP ACTIVATIONS" group (`bin_min` -1, `bin_max` the maximum,
`bin_contains` -1, as `NeuronpediaConverter._parse_sequence_group_title` reads it); each octave band
is an "INTERVAL" (`bin_min`/`bin_max` its bounds, `bin_contains` the share of indexed tokens whose
activation lies in it, from the histogram: SAEDashboard's share is of all tokens too).
`qualifying_token_index` is the index of the example's token in `tokens` and `values`. What the
index does not hold is left empty, as SAEDashboard leaves what it did not compute: neuron
alignment, correlations, the logit histogram, decoder head weights, DFA, vectors. An explanation's
explainer and scores go to `Explanation.notes` (`explanationModelName` must name a row Neuronpedia
already has).
"""

from __future__ import annotations

import gzip
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import gemmascope
from gemmascope.common.config import check, option
from gemmascope.common.files import atomic_dir, read_versioned, write_json
from gemmascope.explore.indexdb import IndexDB
from gemmascope.io._common import site_to_hook

Layout = Literal["import", "dashboard"]
MARKER = "gemmascope-export.json"
"""Written into every export, so a later export replaces only a folder this module wrote."""
FORMAT, FORMAT_VERSION = "gemmascope-neuronpedia-export", 1
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"
"""The user Neuronpedia's own setup creates (`apps/webapp/prisma/seed.ts`; the default
`DEFAULT_CREATOR_USER_ID` of `apps/webapp/.env.localhost`): imported rows must name a user."""
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
_EMPTY = tuple(
    f"{kind}_{part}"
    for kind, parts in (("neuron_alignment", ("indices", "values", "l1")),
                        ("correlated_neurons", ("indices", "l1", "pearson")),
                        ("correlated_features", ("indices", "l1", "pearson")))
    for part in parts
)  # fmt: skip
"""The dashboard's neuron-alignment and correlation lists, which the index does not compute."""
_NEURON_FIELDS = (*_EMPTY, "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
                  "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
                  "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                  "decoder_weights_dist")  # fmt: skip


@dataclass
class NeuronpediaExport:
    """One export of a feature index to Neuronpedia's files."""

    index: Path = option(positional=True)
    """A feature index (`gemmascope index` or `gemmascope import-examples`)."""
    out: Path = option(Path("neuronpedia"), required=True)
    """Folder to write; refused if it exists and this command did not write it."""
    layout: Layout = "import"
    """`import`: the folder Neuronpedia's importer reads (OUT/MODEL_ID/LAYER-SOURCE_SET/, gzipped
    JSON lines, explanations included); `dashboard`: SAEDashboard's batch-N.json files."""
    model_id: str | None = None
    """Neuronpedia model id, e.g. `gemma-2-2b`; default the last part of the index's model name."""
    source_set: str | None = None
    """Neuronpedia source set without the layer, e.g. `gemmascope-res-16k`; default
    `gemmascope-{site}-{width}`."""
    release: str | None = None
    """Release id (`import` only); default the source set."""
    release_title: str = ""
    """Human-readable title of the release; default the release id."""
    creator_name: str = "gemmascope"
    """Author shown on the release and the source set."""
    creator_id: str = DEFAULT_CREATOR_ID
    """Neuronpedia user id that owns the rows; default the user Neuronpedia's own setup creates."""
    url: str = ""
    """Link shown with the release (a paper, the weights)."""
    features_per_batch: int = option(128, ge=1)
    """Latents per batch file (SAEDashboard's `n_features_at_a_time` default)."""
    overwrite: bool = False
    """Replace OUT if an earlier export wrote it (a folder it did not write is always refused)."""

    def __post_init__(self) -> None:
        check(self)
        self.index, self.out = Path(self.index), Path(self.out)
        for name in ("model_id", "source_set", "release"):
            value = getattr(self, name)
            if value is not None and not _ID.fullmatch(value):
                raise ValueError(
                    f"`{name}` {value!r}: Neuronpedia ids are letters, digits, dots and dashes, "
                    "starting with a letter or digit"
                )


def export_neuronpedia(index: Path, out: Path, **options: Any) -> Path:
    """Write a feature index in one of Neuronpedia's layouts (see the module docstring).

    Args:
        index: the index file.
        out: the folder to write (atomically: it appears whole or not at all).
        **options: the other fields of `NeuronpediaExport` (`layout`, `model_id`, ...).
    Returns:
        `out`.
    """
    cfg = NeuronpediaExport(index=Path(index), out=Path(out), **options)
    _check_out(cfg.out, cfg.overwrite)
    db = IndexDB(cfg.index)
    meta = db.meta
    if meta.get("layer") is None:
        raise ValueError(f"{cfg.index}: the index does not say which layer it reads; rebuild it")
    model_id = cfg.model_id or _as_id(Path(str(meta.get("model", "model"))).name)
    source_set = cfg.source_set or _as_id(f"gemmascope-{meta.get('site')}-{_width(db.n_features)}")
    source_id = f"{int(meta['layer'])}-{source_set}"
    batches = _batches(db, model_id, source_set, cfg.features_per_batch)
    with atomic_dir(cfg.out) as tmp:
        if cfg.layout == "dashboard":
            n = 0
            for n, (batch, _) in enumerate(batches, 1):  # the format has no place for explanations
                (tmp / f"batch-{n - 1}.json").write_text(_dumps(batch))
        else:
            where = (model_id, source_set, source_id)
            n = _write_import(tmp / model_id / source_id, batches, cfg, meta, where)
        marker = {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": cfg.layout,
                  "index": str(cfg.index.resolve()), "model_id": model_id,
                  "source_set": source_set, "source_id": source_id,
                  "features": db.n_features, "batches": n,
                  "gemmascope_version": gemmascope.__version__}  # fmt: skip
        write_json(tmp / MARKER, marker)
    return cfg.out


def read_marker(path: Path) -> dict[str, Any]:
    """What an export's marker file records (its layout, ids, latents and batches)."""
    missing = "is it a folder `gemmascope export-neuronpedia` wrote?"
    return read_versioned(path, FORMAT, FORMAT_VERSION, fix="export again", missing=missing)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a file at `out`, a folder this module did not write, or one it wrote
    without `overwrite`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    try:
        read_marker(out / MARKER)
    except (OSError, ValueError):
        raise FileExistsError(
            f"{out}: exists and was not written by `gemmascope export-neuronpedia` (no {MARKER}); "
            "choose another --out, or empty it yourself"
        ) from None
    if not overwrite:
        raise FileExistsError(
            f"{out}: holds an earlier export; pass --overwrite to replace it, or choose another "
            "--out"
        )


def _as_id(text: str) -> str:
    """`text` made a Neuronpedia id: runs of other characters become one dash."""
    cleaned = re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-.")
    return cleaned.lower() or "gemmascope"


def _width(d_sae: int) -> str:
    return f"{d_sae // 1024}k" if d_sae >= 1024 and d_sae % 1024 == 0 else str(d_sae)


# --- SAEDashboard's batches -----------------------------------------------------------------------
Batch = tuple[dict[str, Any], dict[int, dict[str, Any]]]
"""A dashboard batch and the explanations of its latents that have one, by latent."""


def _batches(db: IndexDB, model_id: str, source_set: str, per_batch: int) -> Iterator[Batch]:
    """`NeuronpediaDashboardBatch.to_dict()` of each run of `per_batch` latents, read lazily."""
    meta = db.meta
    for start in range(0, db.n_features, per_batch):
        features, explained = [], {}
        for fid in range(start, min(start + per_batch, db.n_features)):
            f = db.feature(fid)
            assert f is not None, f"latent {fid} missing from an index of {db.n_features}"
            features.append(_dashboard_feature(f, meta))
            if f["explanation"]:
                explained[fid] = f["explanation"]
        batch = {"model_id": model_id, "layer": int(meta["layer"]), "sae_set": source_set,
                 "sae_id_suffix": None, "features": features}  # fmt: skip
        yield batch, explained


def _dashboard_feature(f: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """`NeuronpediaDashboardFeature.to_dict()` of one latent of the index."""
    counts, hi = list(f["histogram"]["counts"]), float(f["histogram"]["hi"])
    while counts and not counts[-1]:  # bins past the maximum, empty by construction
        counts.pop()
    bin_width = hi / len(f["histogram"]["counts"]) if f["histogram"]["counts"] else 0.0
    activations = [_activation(c, -1.0, f["max_act"], -1.0) for c in f["top_contexts"]]
    for band in f["bands"]:
        share = _share(f["histogram"], band["lower"], band["upper"], meta.get("tokens_indexed"))
        activations += [_activation(c, band["lower"], band["upper"], share)
                        for c in band["contexts"]]  # fmt: skip
    lens = f["logit_lens"]
    return {
        "feature_index": f["id"],
        **{name: [] for name in _EMPTY},
        "neg_str": [t["text"] for t in lens["bottom"]],
        "neg_values": [t["value"] for t in lens["bottom"]],
        "pos_str": [t["text"] for t in lens["top"]],
        "pos_values": [t["value"] for t in lens["top"]],
        "frac_nonzero": f["density"],
        "freq_hist_data_bar_values": [round((i + 0.5) * bin_width, 5) for i in range(len(counts))],
        "freq_hist_data_bar_heights": counts,
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "n_prompts_total": int(meta.get("sequences") or 0),
        "n_tokens_in_prompt": int(meta.get("context_size") or 0),
        "dataset": str(meta.get("corpus") or ""),
        "decoder_weights_dist": [],
        "activations": activations,
        "vector": [],
    }


def _activation(c: dict[str, Any], lo: float, hi: float, share: float) -> dict[str, Any]:
    """`NeuronpediaDashboardActivation.to_dict()` of one stored context."""
    return {"bin_min": lo, "bin_max": hi, "bin_contains": share,
            "tokens": [t["text"] for t in c["tokens"]], "values": c["acts"],
            "qualifying_token_index": c["peak"]}  # fmt: skip


def _share(histogram: dict[str, Any], lower: float, upper: float, tokens: int | None) -> float:
    """The share of the indexed tokens whose activation lies in [lower, upper), from the histogram's
    bins (exact: band edges are powers of two below `hi`, and so are bin edges)."""
    counts, hi = histogram["counts"], float(histogram["hi"])
    if not tokens or not counts or hi <= 0:
        return 0.0
    width = hi / len(counts)
    inside = sum(c for i, c in enumerate(counts) if lower <= i * width < upper)
    return inside / int(tokens)


# --- Neuronpedia's import layout ------------------------------------------------------------------
def _write_import(
    folder: Path,
    batches: Iterator[Batch],
    cfg: NeuronpediaExport,
    meta: dict[str, Any],
    ids: tuple[str, str, str],
) -> int:
    """Write the source folder Neuronpedia imports; the number of batches.

    `ids` are the model id, the source set and the source id.
    """
    model_id, source_set, source_id = ids
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    common = {"creatorId": cfg.creator_id, "createdAt": created}
    hook = site_to_hook(int(meta["layer"]), meta.get("site"))
    folder.mkdir(parents=True)
    for name, row in _metadata_rows(cfg, meta, ids).items():
        (folder / f"{name}.jsonl").write_text(_dumps({**row, **common}) + "\n")
    n = 0
    for n, (batch, explained) in enumerate(batches, 1):
        neurons, activations, explanations = [], [], []
        for feat in batch["features"]:
            fid = feat["feature_index"]
            where = {"modelId": model_id, "layer": source_id, "index": str(fid)}
            rows = [_activation_row(a, where, common) for a in feat["activations"] if a["values"]]
            activations += rows
            neurons.append({**where, **common, **_neuron_fields(feat, rows, source_set, hook)})
            if fid in explained:
                explanations.append(_explanation_row(explained[fid], where, cfg, created))
        for kind, rows in (("features", neurons), ("activations", activations),
                           ("explanations", explanations)):  # fmt: skip
            if rows:
                (folder / kind).mkdir(exist_ok=True)
                data = "".join(_dumps(r) + "\n" for r in rows).encode()
                (folder / kind / f"batch-{n - 1}.jsonl.gz").write_bytes(
                    gzip.compress(data, compresslevel=5, mtime=0)
                )
    return n


def _metadata_rows(
    cfg: NeuronpediaExport, meta: dict[str, Any], ids: tuple[str, str, str]
) -> dict[str, dict[str, Any]]:
    """The release, model, source set and source rows (`db_models/source_release.py`, `model.py`,
    `source_set.py`, `source.py`), filled as SAEDashboard's converter fills them."""
    model_id, source_set, source_id = ids
    release = cfg.release or source_set
    urls = [cfg.url] if cfg.url else []
    title = cfg.release_title or release
    return {
        "release": {"name": release, "description": title, "descriptionShort": title,
                    "creatorName": cfg.creator_name, "creatorNameShort": cfg.creator_name,
                    "visibility": "PUBLIC", "isNewUi": False, "featured": False, "urls": urls,
                    "creatorEmail": None, "defaultSourceSetName": None, "defaultSourceId": None,
                    "defaultUmapSourceIds": []},
        "model": {"id": model_id, "instruct": model_id.endswith("-it"),
                  "displayNameShort": model_id, "displayName": model_id, "tlensId": None,
                  "dimension": None, "visibility": "PUBLIC", "defaultSourceSetName": None,
                  "defaultSourceId": None, "inferenceEnabled": False, "layers": 0,
                  "neuronsPerLayer": 0, "owner": "", "website": None,
                  "updatedAt": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "sourceset": {"modelId": model_id, "name": source_set, "hasDashboards": True,
                      "visibility": "PUBLIC", "description": f"{meta.get('site')} - {source_set}",
                      "type": "", "creatorName": cfg.creator_name, "urls": urls,
                      "creatorEmail": None, "releaseName": release, "defaultOfModelId": None,
                      "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False,
                      "showCorrelated": False, "showHeadAttribution": False, "showUmap": False},
        "source": {"id": source_id, "modelId": model_id, "setName": source_set,
                   "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [],
                   "saelensConfig": None, "saelensRelease": None, "saelensSaeId": None,
                   "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC",
                   "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
                   "hasUmapClusters": False, "num_prompts": int(meta.get("sequences") or 0),
                   "num_tokens_in_prompt": int(meta.get("context_size") or 0),
                   "dataset": str(meta.get("corpus") or ""),
                   "notes": f"gemmascope index of {meta.get('sae_source')}"},
    }  # fmt: skip


def _neuron_fields(
    feat: dict[str, Any], rows: list[dict], source_set: str, hook: str | None
) -> dict[str, Any]:
    """A `Neuron` row's own fields (`db_models/feature.py`); `maxActApprox` is the largest example
    and `hookName` the TransformerLens hook of the site, as SAEDashboard's converter sets them."""
    return {"maxActApprox": max((r["maxValue"] for r in rows), default=0.0), "hasVector": False,
            "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": 10,
            "hookName": hook, "topkCosSimIndices": [], "topkCosSimValues": [],
            **{k: feat[k] for k in _NEURON_FIELDS}, "sourceSetName": source_set}  # fmt: skip


def _activation_row(a: dict[str, Any], where: dict[str, str], common: dict) -> dict[str, Any]:
    """An `Activation` row (`db_models/activation.py`); its id must be new to the database."""
    values = a["values"]
    top = max(values)
    return {"id": _new_id(), "tokens": a["tokens"], **where, "maxValue": top,
            "maxValueTokenIndex": values.index(top), "minValue": min(values), "values": values,
            **common, "dataSource": None, "dataIndex": None, "dfaValues": [],
            "dfaTargetIndex": None, "dfaMaxValue": None, "lossValues": [],
            "logitContributions": None, "binMin": a["bin_min"], "binMax": a["bin_max"],
            "binContains": a["bin_contains"], "qualifyingTokenIndex": a["qualifying_token_index"],
            "zIndices": None, "zValues": None}  # fmt: skip


def _explanation_row(
    e: dict[str, Any], where: dict[str, str], cfg: NeuronpediaExport, created: str
) -> dict[str, Any]:
    """An `Explanation` row (`db_models/explanation.py`) of the explanation the explorer shows: the
    one written in it if any, else the explainer's (`gemmascope.evaluate.explanations`)."""
    auto = e.get("auto") or {}
    if e.get("user") or not auto:
        notes = "written in the gemmascope explorer"
    else:
        scores = [f"{k} {auto[k]:.3f}" for k in ("detection", "fuzzing") if auto.get(k) is not None]
        notes = f"gemmascope auto-interpretation by {auto.get('explainer')}" + (
            f"; {', '.join(scores)} (balanced accuracy)" if scores else ""
        )
    return {"id": _new_id(), **where, "description": e["text"], "authorId": cfg.creator_id,
            "typeName": None, "explanationModelName": None, "notes": notes,
            "createdAt": created}  # fmt: skip


def _new_id() -> str:
    """A CUID-shaped primary key (`c` + 24 random hex digits): 96 random bits, so ids of separate
    exports do not collide (the importer silently skips a row whose id exists)."""
    return "c" + uuid.uuid4().hex[:24]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
