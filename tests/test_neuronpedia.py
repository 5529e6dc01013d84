"""Neuronpedia export: both layouts hold the format's fields, with values read back from the index.

The field lists are those of SAEDashboard 0.8.0's `NeuronpediaDashboardFeature.to_dict` /
`NeuronpediaDashboardActivation.to_dict` and of Neuronpedia's `neuronpedia_utils/db_models/*.py`
(see `gemmascope.explore.neuronpedia`). Validated once by hand against SAEDashboard's own code: the
batch files load into `NeuronpediaDashboardBatch` and serialise back unchanged, and its
`neuronpedia_export.export_neuronpedia_dashboards` run on them gives the import layout's rows (but
for random ids, times, `index` written as text and `sourceSetName`).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_index import build, index_config, make_assets
from typer.testing import CliRunner

from gemmascope.cli import app
from gemmascope.evaluate.explanations import store_explanations
from gemmascope.explore.indexdb import IndexDB
from gemmascope.explore.neuronpedia import DEFAULT_CREATOR_ID, MARKER, export_neuronpedia

BATCH_KEYS = ["model_id", "layer", "sae_set", "sae_id_suffix", "features"]
FEATURE_KEYS = [
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations",
    "vector",
]  # fmt: skip
ACTIVATION_KEYS = [
    "bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index",
]  # fmt: skip
NEURON_KEYS = {
    "modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector",
    "vectorLabel", "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices",
    "topkCosSimValues", "sourceSetName", *FEATURE_KEYS[1:15], "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "decoder_weights_dist",
}  # fmt: skip
ACTIVATION_ROW_KEYS = {
    "id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue",
    "values", "creatorId", "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex", "dfaMaxValue",
    "createdAt", "lossValues", "logitContributions", "binMin", "binMax", "binContains",
    "qualifyingTokenIndex", "zIndices", "zValues",
}  # fmt: skip
EXPLAINED = {3: ("the word w10", 0.8, None), 5: ("html tags", 0.7, 0.6)}


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assets = make_assets(tmp_path_factory.mktemp("neuronpedia"))
    path = build(assets, index_config(assets, assets["dir"] / "index.sqlite"))
    details = [{"latent": f, "explanation": t, "detection": d, "fuzzing": z}
               for f, (t, d, z) in EXPLAINED.items()]  # fmt: skip
    store_explanations(path, details, "smollm")
    return path


def test_dashboard_batches_hold_the_index(index: Path, tmp_path: Path) -> None:
    out = export_neuronpedia(index, tmp_path / "np", layout="dashboard", features_per_batch=20)
    db = IndexDB(index)
    assert sorted(p.name for p in out.iterdir()) == ["batch-0.json", "batch-1.json",
                                                     "batch-2.json", MARKER]  # fmt: skip
    features = []
    for n in range(3):
        batch = json.loads((out / f"batch-{n}.json").read_text())
        assert list(batch) == BATCH_KEYS
        assert batch["layer"] == db.meta["layer"] and batch["sae_id_suffix"] is None
        assert batch["model_id"] == "model" and batch["sae_set"] == "gemmascope-resid-post-48"
        features += batch["features"]
    assert [f["feature_index"] for f in features] == list(range(db.n_features))
    summed = 0
    for got in features:
        assert list(got) == FEATURE_KEYS
        want = db.feature(got["feature_index"])
        assert want is not None
        summed += check_feature(got, want, db.meta)
    assert summed > db.n_features // 2


def check_feature(got: dict[str, Any], want: dict[str, Any], meta: dict[str, Any]) -> bool:
    """One dashboard feature against the index's record of that latent; whether every band had a
    sample, so that the bands' shares could be checked against the density."""
    lens = want["logit_lens"]
    assert got["pos_str"] == [t["text"] for t in lens["top"]]
    assert got["pos_values"] == [t["value"] for t in lens["top"]]
    assert got["neg_str"] == [t["text"] for t in lens["bottom"]]
    assert got["neg_values"] == [t["value"] for t in lens["bottom"]]
    assert got["neg_values"] == sorted(got["neg_values"])
    assert got["frac_nonzero"] == want["density"]
    counts, hi = want["histogram"]["counts"], want["histogram"]["hi"]
    heights = got["freq_hist_data_bar_heights"]
    assert heights == counts[: len(heights)] and not any(counts[len(heights) :])
    assert sum(heights) == want["fired"]
    centres = [(i + 0.5) * hi / len(counts) for i in range(len(heights))]
    assert got["freq_hist_data_bar_values"] == pytest.approx(centres)
    assert (got["n_prompts_total"], got["n_tokens_in_prompt"]) == (meta["sequences"], 32)
    top, rest = want["top_contexts"], got["activations"][len(want["top_contexts"]) :]
    for a, c in zip(got["activations"], top, strict=False):
        assert list(a) == ACTIVATION_KEYS
        assert (a["bin_min"], a["bin_max"], a["bin_contains"]) == (-1.0, want["max_act"], -1.0)
        assert a["tokens"] == [t["text"] for t in c["tokens"]] and a["values"] == c["acts"]
        assert a["values"][a["qualifying_token_index"]] == pytest.approx(c["value"], rel=1e-3)
    bands = [(b, c) for b in want["bands"] for c in b["contexts"]]
    assert len(rest) == len(bands)
    for a, (b, c) in zip(rest, bands, strict=True):
        assert (a["bin_min"], a["bin_max"]) == (b["lower"], b["upper"])
        assert a["values"][a["qualifying_token_index"]] == pytest.approx(c["value"], rel=1e-3)
        assert b["lower"] <= c["value"] < b["upper"]
    # every non-zero activation lies in one band, so the bands' shares add up to the density
    shares = {(a["bin_min"], a["bin_max"]): a["bin_contains"] for a in rest}
    if len(shares) < len(want["bands"]) or not shares:
        return False
    assert sum(shares.values()) == pytest.approx(want["density"])
    return True


def gz_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]


def test_import_layout_rows(index: Path, tmp_path: Path) -> None:
    ids = {"model_id": "tiny-gemma3", "source_set": "gs-res-48"}
    out = export_neuronpedia(
        index, tmp_path / "np", features_per_batch=32, url="https://x.org", **ids
    )
    db = IndexDB(index)
    source = out / "tiny-gemma3" / "1-gs-res-48"
    assert json.loads((out / MARKER).read_text())["source_id"] == "1-gs-res-48"
    for name in ("release", "model", "sourceset", "source"):
        lines = (source / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["creatorId"] == DEFAULT_CREATOR_ID
    src = json.loads((source / "source.jsonl").read_text())
    assert (src["id"], src["modelId"], src["setName"]) == ("1-gs-res-48", *ids.values())
    assert json.loads((source / "release.jsonl").read_text())["urls"] == ["https://x.org"]
    assert json.loads((source / "sourceset.jsonl").read_text())["releaseName"] == "gs-res-48"
    neurons = [r for n in range(2) for r in gz_rows(source / "features" / f"batch-{n}.jsonl.gz")]
    acts = [r for n in range(2) for r in gz_rows(source / "activations" / f"batch-{n}.jsonl.gz")]
    assert [r["index"] for r in neurons] == [str(i) for i in range(db.n_features)]
    by_feature: dict[str, list[dict[str, Any]]] = {}
    for a in acts:
        assert set(a) == ACTIVATION_ROW_KEYS and re.fullmatch(r"c[0-9a-f]{24}", a["id"])
        assert (a["modelId"], a["layer"]) == ("tiny-gemma3", "1-gs-res-48")
        assert a["maxValue"] == max(a["values"]) == a["values"][a["maxValueTokenIndex"]]
        by_feature.setdefault(a["index"], []).append(a)
    assert len({a["id"] for a in acts}) == len(acts)
    for row in neurons:
        assert set(row) == NEURON_KEYS and row["hookName"] == "blocks.1.hook_resid_post"
        want = db.feature(int(row["index"]))
        assert want is not None
        mine = by_feature.get(row["index"], [])
        n_contexts = len(want["top_contexts"]) + sum(len(b["contexts"]) for b in want["bands"])
        assert len(mine) == n_contexts
        assert row["frac_nonzero"] == want["density"] and row["sourceSetName"] == "gs-res-48"
        assert row["maxActApprox"] == max((a["maxValue"] for a in mine), default=0.0)
        assert row["pos_str"] == [t["text"] for t in want["logit_lens"]["top"]]
    explanations = gz_rows(source / "explanations" / "batch-0.jsonl.gz")
    assert {int(e["index"]): e["description"] for e in explanations} == {
        f: t for f, (t, _, _) in EXPLAINED.items()
    }
    notes = {int(e["index"]): e["notes"] for e in explanations}
    assert "smollm" in notes[5] and "detection 0.700, fuzzing 0.600" in notes[5]
    assert "fuzzing" not in notes[3]


def test_refuses_what_it_did_not_write(index: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by"):
        export_neuronpedia(index, foreign, overwrite=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        export_neuronpedia(index, tmp_path / "file")
    ours = export_neuronpedia(index, tmp_path / "ours", layout="dashboard")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_neuronpedia(index, ours)
    export_neuronpedia(index, ours, overwrite=True)  # replaced whole: the import layout now
    assert sorted(p.name for p in ours.iterdir()) == [MARKER, "model"]


def test_bad_input_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such index"):
        export_neuronpedia(tmp_path / "missing.sqlite", tmp_path / "out")
    (tmp_path / "junk.sqlite").write_text("not sqlite")
    with pytest.raises(ValueError, match="not a gemmascope index"):
        export_neuronpedia(tmp_path / "junk.sqlite", tmp_path / "out")
    with pytest.raises(ValueError, match="Neuronpedia ids"):
        export_neuronpedia(tmp_path / "junk.sqlite", tmp_path / "out", model_id="a/b")
    assert not (tmp_path / "out").exists()


def test_cli(index: Path, tmp_path: Path) -> None:
    args = ["export-neuronpedia", str(index), "--out", str(tmp_path / "np"), "--layout",
            "dashboard", "--features-per-batch", "16"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "48 latents in 3 batch(es)" in result.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
