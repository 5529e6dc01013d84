"""Feature index: top contexts, density, histogram, bands and logit lens against brute force; resume."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import VOCAB, build_tiny
from transformers import PreTrainedTokenizerFast

import gemmascope
from gemmascope.corpus import iter_documents, pack_sequences, special_ids
from gemmascope.evaluate.feature_stats import FeatureStats
from gemmascope.explore.index import IndexConfig, build_index, checkpoint_path
from gemmascope.explore.indexdb import IndexDB
from gemmascope.hooks import collect
from gemmascope.sae import SAE, SAEConfig

LAYER, SITE, D_SAE, CONTEXT = 1, "resid_post", 48, 32
SCRIPT = "<script>alert(1)</script>"
HTML_WORDS = [SCRIPT, "<b>bold</b>", "&amp;", '"quote"', "<img src=x onerror=alert(2)>"]


def html_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `VOCAB` ids whose first words are HTML, to test escaping."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = HTML_WORDS + [f"w{i}" for i in range(3 + len(HTML_WORDS), VOCAB)]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def write_corpus(path: Path, n_docs: int = 24) -> Path:
    """A .jsonl corpus of random words; one document carries `<script>` and other HTML."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(3 + len(HTML_WORDS), VOCAB)]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(8, 40)))) for _ in range(n_docs)]
    docs[3] = f'w10 w11 {SCRIPT} w12 <b>bold</b> &amp; "quote" <img src=x onerror=alert(2)> w13'
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def random_sae(d_in: int = 32, d_sae: int = D_SAE, seed: int = 0, layer: int = LAYER,
               w_dec: torch.Tensor | None = None) -> SAE:  # fmt: skip
    """A JumpReLU SAE with random weights (or decoder rows `w_dec`, normalised) whose thresholds let
    each latent fire on ~15% of tokens."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig("jumprelu", d_in, d_sae, layer=layer, site=SITE, model="tiny-gemma3")
    w_dec = torch.randn(d_sae, d_in, generator=g) if w_dec is None else w_dec.clone()
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    arrays = {"W_enc": w_dec.T.clone(), "W_dec": w_dec, "b_enc": torch.zeros(d_sae),
              "b_dec": torch.zeros(d_in), "threshold": torch.full((d_sae,), 1.0)}  # fmt: skip
    return SAE.from_arrays(cfg, arrays).eval()


def make_assets(tmp: Path) -> dict[str, Any]:
    """Model, tokenizer and SAE saved as folders (the explorer loads them lazily), and a corpus."""
    model, tok, sae = build_tiny("gemma3"), html_tokenizer(), random_sae()
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    gemmascope.save(sae, tmp / "sae")
    corpus = write_corpus(tmp / "corpus.jsonl")
    return {"model": model, "tokenizer": tok, "sae": sae, "corpus": corpus, "dir": tmp}


def index_config(assets: dict[str, Any], out: Path, **overrides: Any) -> IndexConfig:
    d = assets["dir"]
    return IndexConfig(
        **{
            "sae_source": str(d / "sae"),
            "out": out,
            "model": str(d / "model"),
            "corpus": str(assets["corpus"]),
            "split": "all",
            "tokens": 16 * CONTEXT,
            "context_size": CONTEXT,
            "batch_size": 4,
            "top_k": 5,
            "window": 4,
            "bands": 3,
            "samples": 2,
            "bins": 16,
            "lens_k": 5,
            "checkpoint_seconds": 0,
            **overrides,
        }  # fmt: skip
    )


def build(assets: dict[str, Any], cfg: IndexConfig, **kw: Any) -> Path:
    return build_index(cfg, model=assets["model"], tokenizer=assets["tokenizer"],
                       sae=assets["sae"], progress=False, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_assets(tmp_path_factory.mktemp("explore-assets"))


@pytest.fixture(scope="module")
def built(assets: dict[str, Any]) -> tuple[IndexConfig, Path]:
    cfg = index_config(assets, assets["dir"] / "index.sqlite")
    return cfg, build(assets, cfg)


def brute_force(assets: dict[str, Any], cfg: IndexConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every latent activation `[S, T, m]` (zero at BOS/EOS/pad) and the tokens `[S, T]`."""
    tok = assets["tokenizer"]
    docs = iter_documents(cfg.corpus, cfg.split)
    seqs = list(pack_sequences(docs, tok, cfg.context_size))[: cfg.tokens // cfg.context_size]
    tokens = torch.from_numpy(np.stack(seqs)).long()
    x = collect(assets["model"], tokens, [(LAYER, SITE)])[LAYER, SITE]
    with torch.no_grad():
        z = assets["sae"].encode(x)
    z[torch.isin(tokens, torch.tensor(special_ids(tok)))] = 0
    return z, tokens


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_top_contexts_density_and_histogram_match_brute_force(
    assets: dict[str, Any], built: tuple[IndexConfig, Path]
) -> None:
    cfg, path = built
    z, tokens = brute_force(assets, cfg)
    flat = z.reshape(-1, D_SAE)
    counted = (~torch.isin(tokens, torch.tensor(special_ids(assets["tokenizer"])))).sum()
    db = IndexDB(path)
    assert db.meta["tokens_indexed"] == int(counted)
    assert db.n_features == D_SAE
    fired_any = 0
    for fid in range(D_SAE):
        f = db.feature(fid)
        assert f is not None
        col = flat[:, fid]
        fired = int((col > 0).sum())
        fired_any += fired > 0
        assert f["fired"] == fired
        assert f["density"] == pytest.approx(fired / int(counted))
        assert sum(f["histogram"]["counts"]) == fired
        expected = col.topk(cfg.top_k).values
        expected = expected[expected > 0]
        got = torch.tensor([c["value"] for c in f["top_contexts"]])
        torch.testing.assert_close(got, expected)
        assert f["max_act"] == pytest.approx(float(col.max()))
        for c in f["top_contexts"] + [c for b in f["bands"] for c in b["contexts"]]:
            s, p = c["sequence"], c["position"]
            assert c["tokens"][c["peak"]]["id"] == int(tokens[s, p])
            assert c["acts"][c["peak"]] == pytest.approx(float(z[s, p, fid]), rel=1e-3)
            lo = p - c["peak"]
            window = z[s, lo : lo + len(c["acts"]), fid]
            torch.testing.assert_close(torch.tensor(c["acts"]), window, rtol=1e-3, atol=1e-6)
        for band in f["bands"]:
            for c in band["contexts"]:
                assert band["lower"] <= c["value"] < band["upper"]
            in_band = int(((col >= band["lower"]) & (col < band["upper"]) & (col > 0)).sum())
            assert len(band["contexts"]) == min(cfg.samples, in_band)
    assert fired_any > D_SAE // 2, "the random SAE should make most latents fire"


def test_stats_over_many_chunks_match_brute_force() -> None:
    """Many small chunks, so later ones change only some latents (the in-place fast path)."""
    g = torch.Generator().manual_seed(0)
    m, k, B, T = 16, 3, 2, 8
    scale = torch.rand(m, generator=g) * 5  # latents of very different sizes: hi grows unevenly
    chunks = [torch.relu(torch.randn(B, T, m, generator=g) - 1.5) * scale for _ in range(30)]
    stats = FeatureStats(m, top_k=k, window=2, bands=3, samples=2, bins=8)
    tokens = torch.arange(B * T).view(B, T)
    counted = torch.ones(B, T, dtype=torch.bool)
    for c, z in enumerate(chunks):
        stats.update(z.clone(), tokens, counted, first_sequence=c * B, chunk=c)
    acts = torch.cat(chunks).reshape(-1, m)  # (N, m), row = stream position
    assert int(stats.n_tokens) == len(acts)
    torch.testing.assert_close(stats.fired, (acts > 0).sum(0))
    torch.testing.assert_close(stats.hist.sum(1), (acts > 0).sum(0))
    top = acts.topk(k, dim=0)
    torch.testing.assert_close(stats.top_val.view(m, k), top.values.T)
    torch.testing.assert_close(stats.top_loc.view(m, k), top.indices.T)
    torch.testing.assert_close(stats.top_act.view(m, k, 5)[:, :, 2], top.values.T)  # window centre
    assert torch.all(stats.hi > acts.max(0).values) and torch.all(
        stats.hi <= 2 * acts.max(0).values
    )
    vals, keys = stats.band_val.view(m, 3, 2), stats.band_key.view(m, 3, 2)
    for lat in range(m):
        col = acts[:, lat]
        for band in range(3):
            upper = float(stats.hi[lat]) / 2**band
            lower = upper / 2 if band < 2 else 0.0
            n_in = int(((col > lower) & (col < upper)).sum())
            stored = vals[lat, band][torch.isfinite(keys[lat, band])]
            assert len(stored) == min(2, n_in)
            assert all(lower <= v < upper for v in stored.tolist())
            for slot, v in enumerate(stored.tolist()):
                loc = int(stats.band_loc.view(m, 3, 2)[lat, band, slot])
                assert float(acts[loc, lat]) == v


def test_band_samples_are_uniform_not_the_top() -> None:
    """Over many seeds each band entry is drawn about equally often (not only the largest ones)."""
    z = torch.zeros(1, 40, 1)
    z[0, :, 0] = torch.linspace(0.51, 0.99, 40)  # one band [0.5, 1) once hi = 1
    tokens = torch.arange(40)[None]
    counted = torch.ones(1, 40, dtype=torch.bool)
    hits = torch.zeros(40)
    for seed in range(400):
        stats = FeatureStats(1, top_k=1, window=0, bands=2, samples=2, bins=4, seed=seed)
        stats.update(z.clone(), tokens, counted, first_sequence=0, chunk=0)
        hits[stats.band_loc[:2]] += 1
    assert hits.sum() == 800
    assert hits.min() > 5 and hits.max() < 45  # expected 20 each


def test_histogram_rebins_when_max_grows() -> None:
    stats = FeatureStats(1, top_k=2, window=0, bands=2, samples=1, bins=4)
    tokens, counted = torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool)
    stats.update(torch.tensor([[[0.1], [0.3], [0.9]]]), tokens, counted, 0, 0)  # hi = 1
    assert stats.hi.tolist() == [1.0] and stats.hist.tolist() == [[1, 1, 0, 1]]
    stats.update(torch.tensor([[[3.0], [0.0], [1.5]]]), tokens, counted, 1, 1)  # hi = 4
    # old bins of width 1/4 merge pairwise twice; 1.5 -> bin 1, 3.0 -> bin 3
    assert stats.hi.tolist() == [4.0] and stats.hist.tolist() == [[3, 1, 0, 1]]
    assert stats.fired.tolist() == [5] and int(stats.n_tokens) == 6


def test_resume_after_interruption_gives_the_same_index(
    assets: dict[str, Any], built: tuple[IndexConfig, Path], tmp_path: Path
) -> None:
    cfg = index_config(assets, tmp_path / "resumed.sqlite")

    def crash(chunk: int) -> None:
        if chunk == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(assets, cfg, on_chunk=crash)
    assert checkpoint_path(cfg.out).exists() and not cfg.out.exists()
    seen: list[int] = []
    build(assets, cfg, on_chunk=seen.append)
    assert seen == [2, 3], "the resumed run must not redo merged chunks"
    assert not checkpoint_path(cfg.out).exists()
    tables = ["meta", "features", "contexts", "vocab", "lens_tokens"]
    for table in tables:
        ours = rows(cfg.out, f"SELECT * FROM {table} ORDER BY 1, 2")
        theirs = rows(built[1], f"SELECT * FROM {table} ORDER BY 1, 2")
        if table == "meta":
            ours, theirs = dict(ours), dict(theirs)
            assert ours.keys() == theirs.keys()
            ours.pop("out", None), theirs.pop("out", None)
        assert ours == theirs, table


def test_resume_refuses_other_settings(assets: dict[str, Any], tmp_path: Path) -> None:
    cfg = index_config(assets, tmp_path / "x.sqlite")

    def crash(chunk: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(assets, cfg, on_chunk=crash)
    with pytest.raises(ValueError, match=r"another index run.*top_k"):
        build(assets, index_config(assets, cfg.out, top_k=3))


def test_logit_lens_equals_the_model_own_norm_and_unembedding(
    assets: dict[str, Any], tmp_path: Path
) -> None:
    model = build_tiny("gemma3")
    with torch.no_grad():  # a non-trivial final norm scale, so leaving it out would be caught
        model.model.norm.weight.copy_(torch.randn(32, generator=torch.Generator().manual_seed(3)))
    cfg = index_config(assets, tmp_path / "lens.sqlite", tokens=4 * CONTEXT)
    build_index(cfg, model=model, tokenizer=assets["tokenizer"], sae=assets["sae"], progress=False)
    w_dec = assets["sae"].W_dec.detach()
    with torch.no_grad():
        # The model's RMSNorm also divides by the direction's RMS, a positive per-latent factor.
        logits = model.lm_head(model.model.norm(w_dec))  # (m, V)
        rms = (w_dec.pow(2).mean(-1, keepdim=True) + model.model.norm.eps).sqrt()
    logits = logits * rms
    db = IndexDB(cfg.out)
    for fid in range(D_SAE):
        lens = db.feature(fid)["logit_lens"]  # type: ignore[index]
        top, bottom = logits[fid].topk(cfg.lens_k), logits[fid].topk(cfg.lens_k, largest=False)
        assert [t["id"] for t in lens["top"]] == top.indices.tolist()
        assert [t["id"] for t in lens["bottom"]] == bottom.indices.tolist()
        torch.testing.assert_close(torch.tensor([t["value"] for t in lens["top"]]), top.values,
                                   rtol=1e-3, atol=1e-4)  # fmt: skip


def test_index_rejects_an_sae_of_another_width(assets: dict[str, Any], tmp_path: Path) -> None:
    cfg = index_config(assets, tmp_path / "bad.sqlite")
    sae = random_sae(d_in=16)
    with pytest.raises(ValueError, match="d_in=16"):
        build_index(cfg, model=assets["model"], tokenizer=assets["tokenizer"], sae=sae)


def test_stats_reject_bad_settings() -> None:
    with pytest.raises(ValueError, match="power of two"):
        FeatureStats(4, bins=10)
    with pytest.raises(ValueError, match="top_k"):
        FeatureStats(4, top_k=0)


def test_one_layer_of_a_clt_indexes_as_the_clt_encodes(
    assets: dict[str, Any], tmp_path: Path
) -> None:
    """`--clt-layer N` indexes the latents of a cross-layer transcoder's layer N; steering them from
    the explorer is refused (they write every later layer too)."""
    from gemmascope.clt import CLT
    from gemmascope.explore.catalog import Entry
    from gemmascope.explore.live import InputError, Live

    g = torch.Generator().manual_seed(1)
    L, d = 3, 32
    cfg = SAEConfig("jumprelu", d_in=d, d_sae=D_SAE, layer=0, site="mlp_in", target_site="mlp_out",
                    n_layers=L, model="tiny-gemma3")  # fmt: skip
    clt = CLT.from_arrays(cfg, {
        "W_enc": torch.randn(L, d, D_SAE, generator=g), "b_enc": torch.zeros(L, D_SAE),
        "threshold": torch.full((L, D_SAE), 2.0), "b_dec": torch.zeros(L, d),
        **{f"W_dec_{i}": torch.randn(D_SAE, L - i, d, generator=g) for i in range(L)},
    })  # fmt: skip
    gemmascope.save(clt, tmp_path / "clt")
    base = index_config(assets, tmp_path / "i.sqlite", sae_source=str(tmp_path / "clt"))
    with pytest.raises(ValueError, match=r"pass --clt-layer N \(0..2\)"):
        build_index(base, model=assets["model"], tokenizer=assets["tokenizer"], progress=False)
    cfg1 = index_config(
        assets, tmp_path / "i.sqlite", sae_source=str(tmp_path / "clt"), clt_layer=1
    )
    path = build_index(cfg1, model=assets["model"], tokenizer=assets["tokenizer"], progress=False)
    tokens = torch.tensor(np.stack(list(pack_sequences(
        iter_documents(str(assets["corpus"]), "all"), assets["tokenizer"], CONTEXT))[:16]))  # fmt: skip
    x = collect(assets["model"], tokens, [(1, "mlp_in")])[1, "mlp_in"]
    keep = ~torch.isin(tokens, torch.tensor(special_ids(assets["tokenizer"])))
    with torch.no_grad():
        z = clt.encode_layer(x[keep], 1)  # (n, D_SAE)
    db = IndexDB(path)
    assert db.meta["clt_layer"] == 1 and db.meta["layer"] == 1 and db.meta["site"] == "mlp_in"
    fired = [db.feature(f)["fired"] for f in range(D_SAE)]
    assert fired == (z > 0).sum(0).tolist() and sum(fired) > 0
    with pytest.raises(InputError, match="one layer of a cross-layer transcoder"):
        Live().steer(Entry("clt", db), "w5 w6", 0, 1.0, 4)
