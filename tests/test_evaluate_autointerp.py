"""Auto-interpretation: scoring on known answers, contexts against a brute force, SAEBench's result
class, and the whole eval against a real local explainer server (SmolLM2-135M-Instruct) that the
command starts itself."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_index import make_assets, random_sae
from toolenv import saebench_module

from gemmascope.evaluate import autointerp as ai
from gemmascope.evaluate.explainer import LOCAL_NAME, Explainer, ExplainerConfig
from gemmascope.evaluate.feature_stats import token_decoder
from gemmascope.evaluate.saebench_files import autointerp_output
from gemmascope.hooks import collect

LOCAL_HOST = "http://127.0.0.1"
DEAD = "http://127.0.0.1:9/v1"  # nothing listens there


# ---------------------------------------------------------------- scoring on known answers
def test_answers_parse_to_the_texts_they_name() -> None:
    assert ai.parse_numbers("2, 5", 6) == {1, 4}
    assert ai.parse_numbers("Texts 1 and 3.", 3) == {0, 2}
    assert ai.parse_numbers("9", 3) == set()  # a number, but of no text: names none of them
    assert ai.parse_numbers("None", 4) == set()
    assert ai.parse_numbers("I cannot tell", 4) is None


def test_detection_scores_on_known_answers() -> None:
    labels = [True, False, True, False, False, False]
    oracle = ai.parse_numbers("1, 3", 6)
    assert ai.balanced_accuracy(oracle, labels) == 1.0 and ai.accuracy(oracle, labels) == 1.0
    everything = ai.parse_numbers("1,2,3,4,5,6", 6)
    assert ai.balanced_accuracy(everything, labels) == 0.5
    assert ai.accuracy(everything, labels) == pytest.approx(2 / 6)
    nothing = ai.parse_numbers("None", 6)
    assert ai.balanced_accuracy(nothing, labels) == 0.5 and ai.accuracy(nothing, labels) == 4 / 6
    assert ai.balanced_accuracy({0}, labels) == pytest.approx((0.5 + 1.0) / 2)
    assert ai.balanced_accuracy(None, labels) is None


def test_fuzzing_marks_as_many_tokens_elsewhere() -> None:
    ex = [ai.Example(["a", "b", "c", "d", "e", "f"], [0, 5, 0, 0, 3, 0], 1.0) for _ in range(4)]
    pairs = ai.fuzzing_set(ex, random.Random(0))
    assert [right for _, right in pairs] == [True, False, True, False]
    for text, right in pairs:
        assert text.count("<<") == 2
        assert (text == "a<<b>>cd<<e>>f") == right


def test_explanations_lose_their_lead_in() -> None:
    assert ai._explanation("This feature activates on years in the 1950s.\nmore") == \
        "years in the 1950s"  # fmt: skip
    assert ai._explanation('The feature is active on "or" between alternatives') == \
        '"or" between alternatives'  # fmt: skip
    assert ai._explanation("   ") == ""


# ---------------------------------------------------------------- contexts
def _sequences(n: int = 6, length: int = 24) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [np.concatenate([[2], rng.integers(3, 40, length - 1)]) for _ in range(n)]


def test_random_windows_hold_the_true_activations(tmp_path: Path) -> None:
    assets = make_assets(tmp_path)
    model, tok, sae = assets["model"], assets["tokenizer"], assets["sae"]
    seqs = _sequences()
    stats, pool = ai.collect_contexts(model, tok, [sae], seqs, batch_size=4, progress=False)
    ids = torch.as_tensor(np.stack(seqs))
    with torch.no_grad():
        z = sae.encode(
            collect(model, ids, [(sae.cfg.layer, sae.cfg.site)])[sae.cfg.layer, sae.cfg.site]
        )
    z[ids == 2] = 0  # the BOS never counts
    pos, T = pool["positions"], ids.shape[1]
    per_seq = len(pos) // len(seqs)
    expected = torch.zeros(len(pos), pos.shape[1], sae.cfg.d_sae)
    for w in range(len(pos)):
        inside = (pos[w] >= 0) & (pos[w] < T)
        expected[w, inside] = z[w // per_seq, pos[w, inside]]
        assert pool["tokens"][w, inside].tolist() == ids[w // per_seq, pos[w, inside]].tolist()
    idx, val = pool["hits"][0]
    found = torch.zeros_like(expected)
    found[idx[0], idx[1], idx[2]] = val
    assert torch.allclose(found, expected, atol=1e-5)
    assert int(stats[0].fired.sum()) == int((z > 0).sum())


def test_explain_and_score_windows_never_overlap(tmp_path: Path) -> None:
    assets = make_assets(tmp_path)
    seqs = _sequences(12, 64)
    stats, pool = ai.collect_contexts(assets["model"], assets["tokenizer"], [assets["sae"]], seqs,
                                      batch_size=4, progress=False)  # fmt: skip
    decode = token_decoder(assets["tokenizer"])
    lat = int(stats[0].fired.argmax())
    sets = ai._examples(stats[0], pool, 0, lat, decode, random.Random(0))
    assert len(sets["explain"]) >= 3 and len(sets["random"]) == ai.RANDOM_SCORE
    top = max(max(e.acts) for e in sets["explain"])
    assert top == pytest.approx(float(stats[0].top_val[lat * stats[0].top_k]))
    for e in sets["explain"] + sets["score"]:
        assert any(e.active)  # every kept context is an activation of this latent
    texts = [e.text() for e in sets["explain"] + sets["score"]]
    assert len(set(texts)) == len(texts)


# ---------------------------------------------------------------- SAEBench's result class
@pytest.fixture(scope="module")
def saebench_output() -> Any:
    return saebench_module("sae_bench.evals.autointerp.eval_output").AutoInterpEvalOutput


def test_result_file_validates_with_saebench_class(saebench_output: Any) -> None:
    from pydantic import TypeAdapter

    details = [{"latent": 3, "explanation": "years", "detection": 0.75, "detection_accuracy": 0.8,
                "fuzzing": 0.5}]  # fmt: skip
    found = {"autointerp_score": 0.8, "autointerp_std_dev": 0.0, "detection": 0.75,
             "fuzzing": 0.5, "latents": 1, "scored": 1, "explainer": "x", "details": details}  # fmt: skip
    record = {"model": "tiny", "source": "runs/demo", "sae_id": "layer_1",
              "saebench": {"autointerp": found}}  # fmt: skip
    data = json.loads(json.dumps(autointerp_output(record, {"tokens": 1000})))
    out = TypeAdapter(saebench_output).validate_python(data)
    assert out.eval_type_id == "autointerp"
    assert out.eval_result_metrics.autointerp.autointerp_score == 0.8
    assert out.eval_result_unstructured["details"][0]["explanation"] == "years"


# ---------------------------------------------------------------- a real local explainer
def _index(assets: dict[str, Any], tokens: int) -> Path:
    from gemmascope.explore import IndexConfig, build_index

    d = assets["dir"]
    cfg = IndexConfig(sae_source=str(d / "sae"), out=d / "index.sqlite", model=str(d / "model"),
                      corpus=str(assets["corpus"]), split="all", tokens=tokens, context_size=32,
                      checkpoint_seconds=0)  # fmt: skip
    return build_index(cfg, progress=False)


@pytest.mark.slow
def test_eval_explains_scores_and_stores_in_the_index(tmp_path: Path) -> None:
    """The command starts the local explainer itself (no --explainer-url) and stops it after."""
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from gemmascope.cli import app
    from gemmascope.common.config import build
    from gemmascope.evaluate.job import EvalJob, run_eval
    from gemmascope.explore.app import create_app

    assets = make_assets(tmp_path)
    d = assets["dir"]
    index, cache = _index(assets, 256), d / "answers.sqlite"
    args = [str(d / "sae"), "--model", str(d / "model"), "--corpus", str(assets["corpus"]),
            "--split", "all", "--tokens", "256", "--context-size", "32", "--no-ablations",
            "--evals", "core,autointerp", "--autointerp-latents", "2", "--index", str(index),
            "--saebench-out", str(d / "sb"), "--explainer-cache", str(cache)]  # fmt: skip
    result = CliRunner().invoke(app, ["eval", *args, "--out", str(d / "results.json")])
    assert result.exit_code == 0, result.output
    (record,) = json.loads((d / "results.json").read_text())["results"]
    found = record["saebench"]["autointerp"]
    assert found["latents"] == 2 and len(found["details"]) == 2
    assert found["explainer"] == LOCAL_NAME
    with sqlite3.connect(cache) as db:
        asked = db.execute("SELECT count(*) FROM answers").fetchone()[0]
        (model,) = db.execute("SELECT DISTINCT model FROM answers").fetchone()
    assert 2 <= asked <= 6  # an explanation per latent, then up to 2 scoring requests
    for row in found["details"]:
        for key in ("detection", "fuzzing"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0
    saved = json.loads(next((d / "sb" / "autointerp").glob("*.json")).read_text())
    assert saved["eval_result_unstructured"]["details"] == found["details"]
    # A rerun answers from the cache alone: the same results with the endpoint gone.
    job = build(EvalJob, {"sources": [str(d / "sae")], "model": str(d / "model"),
                          "out": d / "again.json", "corpus": str(assets["corpus"]), "split": "all",
                          "tokens": 256, "context_size": 32, "ablations": False,
                          "evals": ["core", "autointerp"], "autointerp_latents": 2,
                          "explainer_url": DEAD, "explainer_chat_model": model,
                          "explainer_cache": cache})  # fmt: skip
    (again,) = run_eval(job)
    assert again["saebench"]["autointerp"]["details"] == found["details"]
    with sqlite3.connect(cache) as db:
        rows = db.execute("SELECT request, answer FROM answers").fetchall()
    requests, answers = [json.loads(r) for r, _ in rows], [a for _, a in rows]
    offline = Explainer(ExplainerConfig(url=DEAD, cache=cache, chat_model=model), DEAD)
    assert offline.ask_all([(m, n) for m, n in requests] * 2) == answers * 2
    assert offline.asked == 0 and offline.cached == 2 * len(answers)
    stored = [r for r in found["details"] if r["explanation"]]
    assert stored  # the small explainer always says something, if rarely something useful
    from gemmascope.explore import IndexDB

    shown = IndexDB(index).feature(stored[0]["latent"])["explanation"]
    assert shown["text"] == stored[0]["explanation"] and shown["auto"]["explainer"] == LOCAL_NAME
    client = TestClient(create_app(index), base_url=LOCAL_HOST)
    key = client.get("/api/saes").json()["saes"][0]["key"]
    page = client.get(f"/sae/{key}/features/{stored[0]['latent']}")
    assert page.status_code == 200 and "by " + LOCAL_NAME in page.text


def test_index_of_another_sae_is_refused_before_any_work(tmp_path: Path) -> None:
    import gemmascope
    from gemmascope.common.config import build
    from gemmascope.evaluate.job import EvalJob, run_eval

    assets = make_assets(tmp_path)
    d = assets["dir"]
    index = _index(assets, 64)
    gemmascope.save(random_sae(seed=1), d / "other")  # the same shape, other weights
    job = build(EvalJob, {"sources": [str(d / "other")], "model": str(d / "model"),
                          "out": d / "r.json", "index": index, "evals": ["core", "autointerp"],
                          "explainer_url": DEAD, "explainer_chat_model": "x"})  # fmt: skip
    with pytest.raises(ValueError, match="indexes another SAE"):
        run_eval(job)
    with pytest.raises(ValueError, match="add autointerp"):
        build(EvalJob, {"sources": ["x"], "index": index})
    assert not (d / "r.json").exists()


def test_an_explainer_that_does_not_answer_is_refused_before_any_forward(
    tmp_path: Path, no_forward: None
) -> None:
    from gemmascope.evaluate import EvalConfig, evaluate

    assets = make_assets(tmp_path)
    cfg = EvalConfig(corpus=str(assets["corpus"]), split="all", tokens=32, context_size=16,
                     evals=["core", "autointerp"],
                     explainer=ExplainerConfig(url=DEAD, retries=0, cache=tmp_path / "c.sqlite"))  # fmt: skip
    with pytest.raises(RuntimeError, match="did not list its models"):
        evaluate(assets["model"], assets["tokenizer"], [assets["sae"]], cfg, progress=False)


def test_explainer_settings_that_cannot_work_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="give both or neither"):
        ExplainerConfig(chat_model="gpt-4o-mini")  # the local server serves only its own model
    monkeypatch.delenv("GEMMASCOPE_TEST_KEY", raising=False)
    remote = ExplainerConfig(url="https://api.example.invalid/v1", chat_model="m",
                             key_env="GEMMASCOPE_TEST_KEY", cache=tmp_path / "c.sqlite")  # fmt: skip
    with pytest.raises(ValueError, match=r"\$GEMMASCOPE_TEST_KEY is not set"):
        Explainer(remote, remote.url)
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(ValueError, match="not a usable answers cache"):
        Explainer(ExplainerConfig(url=DEAD, chat_model="m", cache=tmp_path / "dir.sqlite"), DEAD)
