"""Explorer API and pages (FastAPI TestClient) on an index of a tiny model over a corpus with `<script>`."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_index import D_SAE, SCRIPT, build, index_config, make_assets

import gemmascope
from gemmascope.explore.app import CSP, MAX_BODY, MAX_NEW_TOKENS, create_app
from gemmascope.explore.indexdb import IndexDB
from gemmascope.explore.live import MAX_TOKENS

LOCAL = "http://127.0.0.1"
"""Base URL of the test clients: the explorer only answers requests addressed to this machine."""
HUGE = "99999999999999999999999999"
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@pytest.fixture(scope="module")
def index_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assets = make_assets(tmp_path_factory.mktemp("explore-api"))
    return build(assets, index_config(assets, assets["dir"] / "index.sqlite"))


@pytest.fixture(scope="module")
def client(index_file: Path) -> TestClient:
    """An explorer that loads the model and SAE lazily from the folders its index names."""
    return TestClient(create_app(index_file), base_url=LOCAL)


def script_feature(client: TestClient) -> dict[str, Any]:
    """A feature whose top contexts contain the `<script>` token."""
    for f in client.get("/api/sae/sae/features", params={"per_page": 200}).json()["features"]:
        full = client.get(f"/api/sae/sae/features/{f['id']}").json()
        if any(t["text"] == SCRIPT for c in full["top_contexts"] for t in c["tokens"]):
            return full
    raise AssertionError("no feature has the <script> token in its top contexts")


def test_list_sorts_pages_and_searches(client: TestClient) -> None:
    body = client.get("/api/sae/sae/features", params={"sort": "density", "per_page": 10}).json()
    assert body["total"] == D_SAE and len(body["features"]) == 10
    densities = [f["density"] for f in body["features"]]
    assert densities == sorted(densities, reverse=True)
    acts = [
        f["max_act"]
        for f in client.get("/api/sae/sae/features?sort=max_act&order=asc").json()["features"]
    ]
    assert acts == sorted(acts)
    page2 = client.get(
        "/api/sae/sae/features", params={"sort": "id", "order": "asc", "page": 2, "per_page": 10}
    )
    assert [f["id"] for f in page2.json()["features"]] == list(range(10, 20))
    assert [f["id"] for f in client.get("/api/sae/sae/features?q=%237").json()["features"]] == [7]
    # search by logit-lens token: every hit has the word among its top tokens
    hits = client.get("/api/sae/sae/features", params={"q": "w12"}).json()
    assert hits["total"] > 0
    for f in hits["features"]:
        lens = client.get(f"/api/sae/sae/features/{f['id']}").json()["logit_lens"]["top"]
        assert any("w12" in t["text"] for t in lens)


def test_feature_detail_and_404(client: TestClient) -> None:
    f = client.get("/api/sae/sae/features/5").json()
    assert f["id"] == 5 and 0 < f["density"] < 1 and f["max_act"] > 0
    assert f["top_contexts"][0]["value"] == pytest.approx(f["max_act"])
    assert len(f["logit_lens"]["top"]) == 5 and f["bands"]
    r = client.get(f"/api/sae/sae/features/{D_SAE}")
    assert r.status_code == 404
    assert (
        r.json()["detail"]
        == f"feature {D_SAE} does not exist; this SAE has features 0..{D_SAE - 1}"
    )
    assert client.get("/api/sae/sae/features/-1").status_code == 404
    page = client.get(f"/sae/sae/features/{D_SAE + 5}")
    assert page.status_code == 404 and "does not exist" in page.text


def test_token_text_is_escaped_in_pages(client: TestClient) -> None:
    f = script_feature(client)
    assert (
        client.get("/api/sae/sae/features?q=script").json()["total"] > 0
    )  # it is a logit-lens chip too
    for url in (f"/sae/sae/features/{f['id']}", "/sae/sae?q=script"):
        html = client.get(url).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<script>alert" not in html and "<img src=x" not in html
    r = client.get("/")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "cdn" not in r.text.lower() and "https://" not in r.text


def test_fires_per_token(client: TestClient) -> None:
    r = client.post("/api/sae/sae/fires", json={"text": f"w10 w11 {SCRIPT} w12"})
    assert r.status_code == 200, r.text
    body = r.json()
    texts = [t["text"] for t in body["tokens"]]
    assert texts == ["<bos>", "w10", "w11", SCRIPT, "w12"]
    assert body["tokens"][0]["special"] and body["tokens"][0]["latents"] == []
    assert any(t["latents"] for t in body["tokens"][1:])
    top = body["features"][0]
    assert top["max_act"] == max(top["acts"]) > 0 and "lens_top" in top
    for t in body["tokens"]:
        acts = [lat["act"] for lat in t["latents"]]
        assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)


def test_feature_lists_read_the_index_on_one_connection(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fires list's summary is one connection and reads no contexts; pages are one each."""
    opened: list[sqlite3.Connection] = []
    statements: list[str] = []
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = real_connect(*args, **kwargs)
        db.set_trace_callback(statements.append)
        opened.append(db)
        return db

    monkeypatch.setattr(sqlite3, "connect", connect)
    r = client.post("/api/sae/sae/fires", json={"text": f"w10 w11 {SCRIPT} w12 w13 w14"})
    assert r.status_code == 200, r.text
    assert len(opened) == 1, statements
    assert not any("contexts" in sql for sql in statements), statements
    features = r.json()["features"]
    assert len(features) > 1
    for f in features[:5]:  # the summary is what the full feature says
        full = client.get(f"/api/sae/sae/features/{f['id']}").json()
        assert f["density"] == full["density"] and f["index_max_act"] == full["max_act"]
        assert f["lens_top"] == [t["text"] for t in full["logit_lens"]["top"][:5]]
    for url in ("/sae/sae", "/sae/sae?q=script", "/api/sae/sae/features?per_page=200",
                "/sae/sae/features/3"):  # fmt: skip
        client.get(url)  # the SAE's densities are read once, on its first page
        opened.clear()
        assert client.get(url).status_code == 200, url
        assert len(opened) == 1, url


def test_steer_changes_generation_and_zero_strength_does_not(client: TestClient) -> None:
    req = {"prompt": "w10 w11", "feature": 3, "max_new_tokens": 8}
    zero = client.post("/api/sae/sae/steer", json={**req, "strength": 0}).json()
    assert zero["steered"] == zero["unsteered"] and len(zero["unsteered"].split()) == 8
    strong = client.post("/api/sae/sae/steer", json={**req, "strength": 40}).json()
    assert strong["unsteered"] == zero["unsteered"] and strong["steered"] != strong["unsteered"]


def test_requests_are_bounded(client: TestClient) -> None:
    too_many = client.post("/api/sae/sae/steer", json={"prompt": "w10", "feature": 1, "strength": 1,
                                               "max_new_tokens": MAX_NEW_TOKENS + 1})  # fmt: skip
    assert too_many.status_code == 422 and "max_new_tokens" in str(too_many.json()["detail"])
    nan = client.post("/api/sae/sae/steer", content=b'{"prompt": "w", "feature": 1, "strength": NaN}',
                      headers={"content-type": "application/json"})  # fmt: skip
    assert nan.status_code == 422
    missing = client.post(
        "/api/sae/sae/steer", json={"prompt": "w10", "feature": D_SAE, "strength": 1}
    )
    assert missing.status_code == 404 and "does not exist" in missing.json()["detail"]
    long_text = " ".join(["w10"] * (MAX_TOKENS + 10))
    r = client.post("/api/sae/sae/fires", json={"text": long_text})
    assert r.status_code == 422 and "tokens long" in r.json()["detail"]
    big = client.post("/api/sae/sae/fires", content=b"x" * (MAX_BODY + 1),
                      headers={"content-type": "application/json"})  # fmt: skip
    assert big.status_code == 413 and "request body over" in big.json()["detail"]
    chunks = (b"x" * 1024 for _ in range(MAX_BODY // 1024 + 2))  # streamed: no Content-Length
    streamed = client.post(
        "/api/sae/sae/fires", content=chunks, headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413 and "request body over" in streamed.json()["detail"]
    assert client.post("/api/sae/sae/fires", json={"text": ""}).status_code == 422
    assert client.post("/api/sae/sae/fires", json={"text": "w1", "path": "/etc"}).status_code == 422
    assert client.get("/api/sae/sae/features?sort=nope").status_code == 422


def test_pages_render(client: TestClient) -> None:
    for url in ("/", "/sae/sae/fires", "/sae/sae/steer?feature=3", "/sae/sae/features/0", "/static/style.css",
                "/static/explore.js"):  # fmt: skip
        assert client.get(url).status_code == 200, url
    assert client.get("/docs").status_code == 404  # Swagger UI would pull a CDN


def test_create_app_rejects_a_non_index(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        create_app(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ValueError, match="not a gemmascope index"):
        create_app(tmp_path / "junk.sqlite")


def assert_security_headers(r: Any) -> None:
    assert {k: r.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, (
        r.status_code,
        r.headers,
    )


@pytest.mark.parametrize(
    "url",
    [f"/api/sae/sae/features?q={HUGE}", f"/api/sae/sae/features?q=%23{HUGE}", f"/api/sae/sae/features?q={D_SAE}",
     f"/sae/sae?q={HUGE}", f"/sae/sae?q=%23{D_SAE}", f"/sae/sae/steer?feature={D_SAE}", f"/sae/sae/steer?feature={HUGE}"],
)  # fmt: skip
def test_a_number_out_of_range_in_a_query_is_422(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 422, r.text
    assert f"features 0..{D_SAE - 1}" in r.text
    assert_security_headers(r)


@pytest.mark.parametrize("q", ["²", "٣", "#٣", "1²"])
def test_a_query_of_unicode_digits_is_a_text_search(client: TestClient, q: str) -> None:
    r = client.get("/api/sae/sae/features", params={"q": q})
    assert r.status_code == 200, r.text
    assert r.json()["total"] == 0  # no logit-lens token holds these characters


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example:80",
     "127.0.0.1:8000@evil.example", "127.0.0.1:x", "[::2]:8000", "[::1", "[::1]x", ""],
)  # fmt: skip
def test_a_foreign_host_header_is_400(client: TestClient, host: str) -> None:
    r = client.get("/api/sae/sae", headers={"host": host})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert repr(host) in detail and "--host" in detail and "127.0.0.1" in detail
    assert_security_headers(r)


@pytest.fixture(scope="module")
def lan_client(index_file: Path) -> TestClient:
    """An explorer also serving the name `box.lan`, as `gemmascope explore --host box.lan` makes it."""
    return TestClient(create_app(index_file, hosts=("127.0.0.1", "localhost", "::1", "box.lan")))


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8000", "127.0.0.1", "localhost", "LocalHost:8000", "localhost.", "[::1]:8000",
             "[::1]", "box.lan", "BOX.LAN:8080"]
)  # fmt: skip
def test_allowed_hosts_are_served(lan_client: TestClient, host: str) -> None:
    r = lan_client.get("/api/sae/sae", headers={"host": host})
    assert r.status_code == 200, r.text
    assert r.json()["n_features"] == D_SAE
    assert_security_headers(r)


def test_the_default_hosts_leave_out_other_names(lan_client: TestClient, index_file: Path) -> None:
    assert lan_client.get("/api/sae/sae", headers={"host": "evil.example"}).status_code == 400
    plain = TestClient(create_app(index_file))  # host `testserver`: not this machine's name
    r = plain.get("/api/sae/sae", headers={"host": "box.lan"})
    assert r.status_code == 400 and "box.lan" in r.json()["detail"]


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("forced failure")


ERRORS: dict[str, tuple[int, Any]] = {
    "404 api": (404, lambda c: c.get(f"/api/sae/sae/features/{D_SAE}")),
    "404 page": (404, lambda c: c.get(f"/sae/sae/features/{D_SAE}")),
    "404 route": (404, lambda c: c.get("/nope")),
    "405": (405, lambda c: c.put("/api/sae/sae", json={})),
    "413 declared": (413, lambda c: c.post("/api/sae/sae/fires", content=b"x" * (MAX_BODY + 1))),
    "413 streamed": (
        413,
        lambda c: c.post(
            "/api/sae/sae/fires",
            content=(b"x" * 1024 for _ in range(80)),
            headers={"content-type": "application/json"},
        ),
    ),  # fmt: skip
    "415": (415, lambda c: c.post("/api/sae/sae/fires", content=b'{"text": "w10"}')),
    "403": (
        403,
        lambda c: c.post(
            "/api/sae/sae/fires", json={"text": "w10"}, headers={"sec-fetch-site": "cross-site"}
        ),
    ),
    "422": (422, lambda c: c.get("/api/sae/sae/features?sort=nope")),
    "400": (400, lambda c: c.get("/", headers={"host": "evil.example"})),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_carry_the_security_headers(client: TestClient, case: str) -> None:
    status, call = ERRORS[case]
    r = call(client)
    assert r.status_code == status, r.text
    assert_security_headers(r)


@pytest.mark.parametrize(
    "url", ["/api/sae/sae/features/3", "/sae/sae/features/3", "/api/sae/sae/features", "/"]
)
def test_an_unhandled_error_is_a_json_500_with_the_headers(
    index_file: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setattr(IndexDB, "feature", _raise)
    monkeypatch.setattr(IndexDB, "list_features", _raise)
    client = TestClient(create_app(index_file), base_url=LOCAL, raise_server_exceptions=False)
    r = client.get(url)
    assert r.status_code == 500
    assert "internal error" in r.json()["detail"] and "forced" not in r.text
    assert_security_headers(r)


@pytest.mark.parametrize(
    "url", ["/", "/sae/sae?q=w12", "/sae/sae/features/3", "/sae/sae/fires", "/sae/sae/steer?feature=3", "/api/sae/sae",
            "/api/sae/sae/features", "/api/sae/sae/features/3", "/static/style.css", "/static/explore.js"]
)  # fmt: skip
def test_head_works_where_get_does(client: TestClient, url: str) -> None:
    get, head = client.get(url), client.head(url)
    assert head.status_code == get.status_code == 200, head.text
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["content-length"] == str(len(get.content))
    assert_security_headers(head)


@pytest.mark.slow
def test_real_gemma_index_lens_and_explorer(tmp_path: Path) -> None:
    """Gemma 3 270M: the lens applies the final RMSNorm's (1 + w); fires and steering run lazily."""
    import torch

    from gemmascope.explore.index import IndexConfig, build_index
    from gemmascope.models import load_model
    from gemmascope.sae import SAE, SAEConfig

    model, tok = load_model("gemma-3-270m")
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(256, 640, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    cfg = SAEConfig("jumprelu", 640, 256, layer=6, site="resid_post", model="gemma-3-270m")
    sae = SAE.from_arrays(cfg, {"W_enc": w_dec.T.clone(), "W_dec": w_dec, "b_enc": torch.zeros(256),
                                "b_dec": torch.zeros(640), "threshold": torch.full((256,), 20.0)})  # fmt: skip
    gemmascope.save(sae, tmp_path / "sae")
    index = IndexConfig(sae_source=str(tmp_path / "sae"), out=tmp_path / "g.sqlite", tokens=2048)
    build_index(index, model=model, tokenizer=tok, sae=sae, progress=False)
    with torch.no_grad():
        norm = model.model.norm
        direct = model.lm_head(norm(w_dec[:8]))  # the model's own norm also divides by the RMS
    client = TestClient(create_app(index.out), base_url=LOCAL)
    for fid in range(8):
        lens = client.get(f"/api/sae/sae/features/{fid}").json()["logit_lens"]["top"]
        assert [t["id"] for t in lens] == direct[fid].topk(10).indices.tolist()
    fires = client.post("/api/sae/sae/fires", json={"text": "The cat sat on the mat."}).json()
    assert fires["tokens"][0]["text"] == "<bos>" and "".join(
        t["text"] for t in fires["tokens"][1:]
    ) == ("The cat sat on the mat.")
    steer = client.post("/api/sae/sae/steer", json={"prompt": "I think", "feature": 0, "strength": 0,
                                            "max_new_tokens": 6}).json()  # fmt: skip
    assert steer["steered"] == steer["unsteered"] and steer["unsteered"]
