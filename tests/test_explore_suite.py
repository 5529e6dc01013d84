"""The explorer over many SAEs: one forward indexes them all, the catalog's grid and metrics,
neighbours across widths and layers, search (explanations, logit lens, inference), the prompt
heat-map, co-firing, user explanations, and the hostile-input checks on every new endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from test_index import CONTEXT, SCRIPT, index_config, make_assets, random_sae

import gemmascope
from gemmascope.evaluate.explanations import store_explanations
from gemmascope.evaluate.results import write_results
from gemmascope.explore.app import MAX_BODY, create_app
from gemmascope.explore.catalog import Catalog
from gemmascope.explore.index import build_index, build_indexes
from gemmascope.explore.indexdb import IndexDB
from gemmascope.hooks import collect

LOCAL = "http://127.0.0.1"
SHARED_ROW = 5
"""Latent of the base SAE whose decoder row the other SAEs copy (at `COPIES`)."""
COPIES = {"wide": 17, "next": 3}


def _saes() -> dict[str, Any]:
    """Four SAEs of the tiny model: base (layer 1, 48 latents), wide (layer 1, 96), low (layer 1,
    48, another L0 target) and next (layer 2, 48); wide and next hold base's latent 5 direction."""
    base = random_sae(seed=0, layer=1)
    shared = base.W_dec[SHARED_ROW].detach()
    wide_rows = torch.randn(96, 32, generator=torch.Generator().manual_seed(1))
    wide_rows[COPIES["wide"]] = shared
    next_rows = torch.randn(48, 32, generator=torch.Generator().manual_seed(2))
    next_rows[COPIES["next"]] = shared
    saes = {"base": base, "wide": random_sae(d_sae=96, layer=1, w_dec=wide_rows),
            "low": random_sae(seed=3, layer=1), "next": random_sae(layer=2, w_dec=next_rows)}  # fmt: skip
    for name, target in (("base", 20.0), ("wide", 20.0), ("low", 10.0), ("next", 20.0)):
        saes[name].cfg.extra["spec"] = {"target_l0": target}
    return saes


def suite_folder(root: Path) -> dict[str, Any]:
    """A folder laid out as a suite's: runs/ with the SAEs, index/ with their indexes (built
    together), results.json with an evaluation record of one of them."""
    assets = make_assets(root)
    saes = _saes()
    cfgs = []
    for name, sae in saes.items():
        gemmascope.save(sae, root / "runs" / name)
        out = root / "index" / f"{name}.sqlite"
        out.parent.mkdir(parents=True, exist_ok=True)
        cfgs.append(index_config(assets, out, sae_source=str(root / "runs" / name)))
    build_indexes(cfgs, model=assets["model"], tokenizer=assets["tokenizer"],
                  saes=list(saes.values()), progress=False)  # fmt: skip
    (root / "suite.json").write_text("{}")
    record = {"source": str(root / "runs"), "sae_id": "base", "l0": 21.5, "fvu": 0.25,
              "delta_lm_loss": 0.125, "saebench": {"autointerp": {"autointerp_score": 0.75}}}  # fmt: skip
    write_results(root / "results.json", [record], {"suite": "test"})
    return {"root": root, "assets": assets, "saes": saes, "cfgs": cfgs}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return suite_folder(tmp_path_factory.mktemp("suite"))


@pytest.fixture(scope="module")
def client(suite: dict[str, Any]) -> TestClient:
    return TestClient(create_app(suite["root"]), base_url=LOCAL)


def test_one_forward_indexes_each_sae_as_alone(suite: dict[str, Any], tmp_path: Path) -> None:
    """The index of an SAE built beside three others equals the one built alone, row for row."""
    assets, saes = suite["assets"], suite["saes"]
    alone = build_index(index_config(assets, tmp_path / "next.sqlite",
                                      sae_source=str(suite["root"] / "runs" / "next")),
                        model=assets["model"], tokenizer=assets["tokenizer"], sae=saes["next"],
                        progress=False)  # fmt: skip
    together, single = IndexDB(suite["cfgs"][3].out), IndexDB(alone)
    for fid in range(48):
        assert together.feature(fid) == single.feature(fid)


def test_indexes_built_together_must_share_the_corpus(
    suite: dict[str, Any], tmp_path: Path
) -> None:
    a = index_config(suite["assets"], tmp_path / "a.sqlite")
    b = index_config(suite["assets"], tmp_path / "b.sqlite", tokens=8 * CONTEXT)
    with pytest.raises(ValueError, match="differs .* in tokens"):
        build_indexes(
            [a, b], model=suite["assets"]["model"], tokenizer=suite["assets"]["tokenizer"]
        )
    with pytest.raises(ValueError, match="same index file"):
        build_indexes(
            [a, a], model=suite["assets"]["model"], tokenizer=suite["assets"]["tokenizer"]
        )


def test_catalog_orders_the_grid_and_matches_metrics(suite: dict[str, Any]) -> None:
    cat = Catalog(suite["root"])
    assert [(e.key, e.layer, e.width) for e in cat] == [
        ("low", 1, 48), ("base", 1, 48), ("wide", 1, 96), ("next", 2, 48)]  # fmt: skip
    base = cat.get("base")
    assert base is not None and base.l0 == 21.5  # measured, not the target
    assert base.metrics["autointerp.autointerp_score"] == 0.75 and base.metrics["fvu"] == 0.25
    assert cat.get("low").l0 == 10.0  # type: ignore[union-attr] - not evaluated: its target
    assert {e.key for e in cat.same_site(base)} == {"low", "wide"}
    assert cat.adjacent(base, 1).key == "next" and cat.adjacent(base, -1) is None  # type: ignore[union-attr]
    (sites,) = cat.tree().values()  # one model
    assert {site: list(layers) for site, layers in sites.items()} == {"resid_post": [1, 2]}


def test_neighbours_find_the_copied_direction(client: TestClient) -> None:
    n = client.get(f"/api/sae/base/features/{SHARED_ROW}/neighbours").json()
    assert len(n["within"]) == 8 and SHARED_ROW not in [x["id"] for x in n["within"]]
    coss = [x["cos"] for x in n["within"]]
    assert coss == sorted(coss, reverse=True) and max(coss) < 0.999
    wide = next(g for g in n["other_saes"] if g["key"] == "wide")
    assert wide["latents"][0]["id"] == COPIES["wide"]
    assert wide["latents"][0]["cos"] == pytest.approx(1.0, abs=1e-5)
    assert n["next"]["key"] == "next" and n["next"]["latents"][0]["id"] == COPIES["next"]
    assert n["previous"] is None
    back = client.get(f"/api/sae/next/features/{COPIES['next']}/neighbours").json()
    assert back["previous"]["key"] in ("base", "low")


def test_search_by_explanation_lens_and_inference(
    suite: dict[str, Any], client: TestClient
) -> None:
    details = [{"latent": 9, "explanation": "whale songs in the ocean", "detection": 0.8,
                "fuzzing": 0.7}, {"latent": 11, "explanation": "", "detection": None,
                                  "fuzzing": None}]  # fmt: skip
    assert store_explanations(suite["cfgs"][1].out, details, "test-explainer") == 1
    for q in ("whale", "WHALES songs"[:5], "wha", "ocean whale"):
        hits = client.get("/api/search", params={"q": q}).json()["explanations"]
        assert [(h["sae"], h["id"]) for h in hits] == [("wide", 9)], q
        assert hits[0]["explanation"] == "whale songs in the ocean"
    assert client.get("/api/search", params={"q": "dolphin"}).json()["explanations"] == []
    r = client.get("/api/search", params={"q": "w12"}).json()
    assert r["lens"]
    for h in r["lens"]:  # each lens hit promotes a token holding the text
        lens = client.get(f"/api/sae/{h['sae']}/features/{h['id']}").json()["logit_lens"]["top"]
        assert any("w12" in t["text"] for t in lens)
    fired = r["fires"]
    assert fired and [h["frac"] for h in fired] == sorted((h["frac"] for h in fired), reverse=True)
    page = client.get("/search", params={"q": "whale"})
    assert page.status_code == 200 and 'href="/sae/wide/features/9"' in page.text


def test_prompt_heat_map_is_the_encoders_argmax(suite: dict[str, Any], client: TestClient) -> None:
    text = "w10 w11 w12 w13"
    body = client.post("/api/prompt", json={"text": text, "width": 48, "l0": 20}).json()
    assert [(r["key"], r["layer"]) for r in body["rows"]] == [("base", 1), ("next", 2)]
    tok, model = suite["assets"]["tokenizer"], suite["assets"]["model"]
    ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
    acts = collect(model, ids, [(1, "resid_post"), (2, "resid_post")])
    for row in body["rows"]:
        z = suite["saes"][row["key"]].encode(acts[row["layer"], "resid_post"][0]).detach()  # (T, m)
        for t in range(1, z.shape[0]):
            cell = row["cells"][t]
            if z[t].max() > 0:
                assert cell[0]["id"] == int(z[t].argmax()) and cell[0]["act"] == pytest.approx(
                    float(z[t].max()), rel=1e-5)  # fmt: skip
                assert 0 < cell[0]["frac"] <= 1
            else:
                assert cell == []
    wide = client.post("/api/prompt", json={"text": text, "width": 96}).json()
    assert [r["key"] for r in wide["rows"]] == ["wide", "next"]  # no 96 at layer 2: its one SAE
    assert client.get("/prompt").status_code == 200


def test_cofiring_latents_fire_at_the_peaks(suite: dict[str, Any], client: TestClient) -> None:
    fid = 2
    got = client.get(f"/api/sae/base/features/{fid}/cofiring").json()["latents"]
    f = client.get(f"/api/sae/base/features/{fid}").json()
    tok, model, sae = suite["assets"]["tokenizer"], suite["assets"]["model"], suite["saes"]["base"]
    counts: dict[int, int] = {}
    for c in f["top_contexts"]:
        window = [t["id"] for t in c["tokens"]]
        lead = [] if window[0] == tok.bos_token_id else [tok.bos_token_id]
        ids = torch.tensor([lead + window])
        z = sae.encode(collect(model, ids, [(1, "resid_post")])[1, "resid_post"][0]).detach()
        z = z[len(lead) :]
        for i in torch.nonzero(z[c["peak"]] > 0).flatten().tolist():
            if i != fid:
                counts[i] = counts.get(i, 0) + 1
    assert got, "nothing fires with this latent"
    assert [x["together"] for x in got] == sorted((counts[x["id"]] for x in got), reverse=True)
    assert max(counts.values()) == got[0]["together"]
    assert all(x["of"] == len(f["top_contexts"]) for x in got)


def test_user_explanation_is_stored_shown_and_searchable(suite: dict[str, Any],
                                                         client: TestClient) -> None:  # fmt: skip
    url = "/api/sae/wide/features/9/explanation"
    r = client.put(url, json={"text": f"  humpback {SCRIPT} calls  "})
    assert r.status_code == 200, r.text
    shown = r.json()["explanation"]
    assert shown["text"] == f"humpback {SCRIPT} calls" and shown["user"] == shown["text"]
    assert shown["auto"]["text"] == "whale songs in the ocean"  # the explainer's is kept
    hits = client.get("/api/search", params={"q": "humpback"}).json()["explanations"]
    assert [(h["sae"], h["id"]) for h in hits] == [("wide", 9)]
    page = client.get("/sae/wide/features/9").text
    assert "humpback &lt;script&gt;" in page and "<script>alert" not in page
    assert client.put(url, json={"text": ""}).json()["explanation"]["text"] == (
        "whale songs in the ocean")  # fmt: skip
    assert client.get("/api/search", params={"q": "humpback"}).json()["explanations"] == []
    assert client.put(url, json={"text": "x" * 1001}).status_code == 422
    assert client.put(url, json={"text": "a", "path": "/etc"}).status_code == 422
    # a form or a plain-text body (what another site can send without a preflight) is refused,
    # and so is any request a browser says came from another site
    assert client.put(url, data={"text": "spam"}).status_code == 415
    assert client.post("/api/prompt", content=b'{"text": "w10"}',
                       headers={"content-type": "text/plain"}).status_code == 415  # fmt: skip
    assert client.put(url, json={"text": "spam"},
                      headers={"sec-fetch-site": "cross-site"}).status_code == 403  # fmt: skip
    assert (
        client.put(url, json={"text": ""}, headers={"sec-fetch-site": "same-origin"}).status_code
        == 200
    )
    assert client.post(url, json={"text": "a"}).status_code == 405


def test_a_read_only_index_refuses_edits_clearly(client: TestClient,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import sqlite3

    import gemmascope.explore.service as service

    def read_only(*args: Any) -> None:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(service, "store_user_explanation", read_only)
    r = client.put("/api/sae/base/features/1/explanation", json={"text": "x"})
    assert r.status_code == 503 and "read-only" in r.json()["detail"]


def test_pages_of_a_suite_render(client: TestClient) -> None:
    home = client.get("/")
    assert home.status_code == 200
    for key in ("low", "base", "wide", "next"):
        assert f'href="/sae/{key}"' in home.text
    base = client.get("/sae/base").text
    assert "delta_lm_loss" in base and "0.125" in base and 'href="/sae/wide"' in base
    assert 'id="density-hist"' in base
    for url in ("/sae/base/features/5", "/sae/next/fires", "/sae/wide/steer?feature=3",
                "/search?q=w10", "/prompt"):  # fmt: skip
        assert client.get(url).status_code == 200, url


HOSTILE = [
    ("get", "/sae/nope"), ("get", "/sae/nope/features/1"), ("get", "/sae/..%2F..%2Fetc/features/1"),
    ("get", "/api/sae/nope"), ("get", "/api/sae/nope/features"),
    ("get", "/api/sae/nope/features/1/neighbours"), ("get", "/api/sae/base/features/48/neighbours"),
    ("get", "/api/sae/base/features/-1/cofiring"), ("get", "/api/sae/base/features/99999999999999999999/cofiring"),
    ("put", "/api/sae/nope/features/1/explanation"), ("put", "/api/sae/base/features/48/explanation"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "url"), HOSTILE)
def test_unknown_saes_and_latents_are_404(client: TestClient, method: str, url: str) -> None:
    kw = {"json": {"text": "x"}} if method == "put" else {}
    r = getattr(client, method)(url, **kw)
    assert r.status_code in (404, 422), r.text
    assert "content-security-policy" in r.headers


@pytest.mark.parametrize("url", ["/api/prompt", "/api/sae/base/fires", "/api/sae/base/steer",
                                 "/api/sae/base/features/1/explanation"])  # fmt: skip
def test_new_endpoints_refuse_oversized_and_malformed_bodies(client: TestClient, url: str) -> None:
    call = client.put if url.endswith("explanation") else client.post
    big = call(url, content=b"x" * (MAX_BODY + 1), headers={"content-type": "application/json"})
    assert big.status_code == 413
    assert (
        call(url, content=b"{nope", headers={"content-type": "application/json"}).status_code == 422
    )


def test_prompt_bounds(client: TestClient) -> None:
    assert client.post("/api/prompt", json={"text": ""}).status_code == 422
    r = client.post("/api/prompt", json={"text": " ".join(["w10"] * 300)})
    assert r.status_code == 422 and "tokens long" in r.json()["detail"]
    r = client.post("/api/prompt", json={"text": "w10", "sites": ["mlp_out"]})
    assert r.status_code == 422 and "choose one or more of ['resid_post']" in r.json()["detail"]
    assert client.post("/api/prompt", json={"text": "w10", "sites": []}).status_code == 422
    r = client.post("/api/prompt", json={"text": "w10", "width": 50})
    assert r.status_code == 422 and "[48, 96]" in r.json()["detail"]
    inf = client.post("/api/prompt", content=b'{"text": "w", "l0": Infinity}',
                      headers={"content-type": "application/json"})  # fmt: skip
    assert inf.status_code == 422
    assert client.post("/api/prompt", json={"text": "w", "sites": ["x"] * 11}).status_code == 422
    assert client.get("/api/search", params={"q": "x" * 201}).status_code == 422
    page = client.get("/search", params={"q": SCRIPT})
    assert page.status_code == 200 and "<script>alert" not in page.text


def test_runs_resumed_from_different_chunks_equal_uninterrupted(suite: dict[str, Any],
                                                                tmp_path: Path) -> None:  # fmt: skip
    """Killed after chunk 2, one run's checkpoint lost: the resumed pair still equals the full one."""
    from gemmascope.explore.index import checkpoint_path

    assets, saes = suite["assets"], suite["saes"]
    cfgs = [index_config(assets, tmp_path / f"{k}.sqlite", sae_source=str(suite["root"] / "runs" / k))
            for k in ("base", "next")]  # fmt: skip
    pair = [saes["base"], saes["next"]]

    def die(chunk: int) -> None:
        if chunk == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_indexes(cfgs, model=assets["model"], tokenizer=assets["tokenizer"], saes=pair,
                      progress=False, on_chunk=die)  # fmt: skip
    checkpoint_path(cfgs[0].out).unlink()  # base starts again from chunk 0, next from chunk 3
    merged: list[int] = []
    build_indexes(cfgs, model=assets["model"], tokenizer=assets["tokenizer"], saes=pair,
                  progress=False, on_chunk=merged.append)  # fmt: skip
    assert merged[0] == 0  # chunks 0..2 forwarded again for base only
    for cfg, whole in zip(cfgs, (suite["cfgs"][0].out, suite["cfgs"][3].out), strict=True):
        resumed, full = IndexDB(cfg.out), IndexDB(whole)
        for fid in range(48):
            assert resumed.feature(fid) == full.feature(fid)
