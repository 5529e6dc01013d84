"""Evaluation metrics: known answers, a reference computed the slow way, many SAEs at once, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_tiny, tiny_tokenizer
from torch.testing import assert_close
from typer.testing import CliRunner

import gemmascope
import gemmascope.common.progress as progress_module
from gemmascope.evaluate import (
    evaluate,
    evaluate_sequences,
    expand_sources,
    read_results,
    token_losses,
    write_results,
)
from gemmascope.hooks import collect
from gemmascope.models import model_info
from gemmascope.sae import SAE, SAEConfig

SPECIAL = [0, 1, 2]  # pad, eos, bos of the tiny models
FLOATS = ("l0", "mse", "fvu", "explained_variance", "cosine", "relative_norm", "ce_clean",
          "ce_spliced", "ce_zero", "ce_mean", "delta_lm_loss", "frac_recovered")  # fmt: skip


def _sequences(n: int = 6, length: int = 16, seed: int = 0) -> torch.Tensor:
    """BOS-led random sequences with an EOS inside, as packing makes them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    ids[:, 0] = 2
    ids[1, 7] = 1
    return ids


def _identity(model: Any, layer: int, site: str) -> SAE:
    """relu SAE with W_enc = [I, -I], W_dec = [I; -I]: x_hat = relu(x) - relu(-x) = x exactly."""
    d = model_info(model).site_width(site)
    sae = SAE(SAEConfig("relu", d_in=d, d_sae=2 * d, layer=layer, site=site))
    eye = torch.eye(d)
    sae.W_enc.data = torch.cat([eye, -eye], 1)
    sae.W_dec.data = torch.cat([eye, -eye], 0)
    return sae


def _random(model: Any, layer: int, site: str, arch: str = "jumprelu", seed: int = 0) -> SAE:
    d = model_info(model).site_width(site)
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(arch, d_in=d, d_sae=48, k=6, layer=layer, site=site))  # type: ignore[arg-type]
    for name, scale in (("W_enc", 0.3), ("W_dec", 0.3), ("b_enc", 0.1), ("b_dec", 0.1)):
        p = getattr(sae, name)
        p.data = torch.randn(p.shape, generator=g) * scale
    sae.threshold.data = torch.rand(48, generator=g) * 0.2
    return sae


def _eval(model: Any, saes: list[SAE], ids: torch.Tensor, **kw: Any) -> list[dict[str, Any]]:
    return evaluate_sequences(model, saes, ids, skip_ids=SPECIAL, pad_id=0, batch_size=4, **kw)


@pytest.mark.parametrize("family", ["gemma2", "gpt2", "llama"])
def test_identity_sae_is_lossless_at_every_site(family: str) -> None:
    model = build_tiny(family)
    sites = [(0, "resid_pre"), (0, "attn_z"), (1, "mlp_out"), (1, "attn_out"), (2, "resid_post")]
    for r in _eval(model, [_identity(model, *key) for key in sites], _sequences()):
        assert r["delta_lm_loss"] == pytest.approx(0, abs=1e-6), r["site"]
        assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-6)
        assert r["frac_recovered"] == pytest.approx(1, abs=1e-5)
        assert r["fvu"] == 0 and r["mse"] == 0
        assert r["explained_variance"] == pytest.approx(1)
        assert r["relative_norm"] == pytest.approx(1) and r["cosine"] == pytest.approx(1)
        assert r["l0"] == r["d_in"]  # one of relu(x_i), relu(-x_i) per coordinate


def test_zero_and_mean_predictors_give_the_ablation_losses() -> None:
    model, ids, key = build_tiny("gemma3"), _sequences(), (1, "resid_post")
    x = collect(model, ids, [key])[key][~torch.isin(ids, torch.tensor(SPECIAL))]  # (n, d)
    zero, mean = _identity(model, *key), _identity(model, *key)
    for sae in (zero, mean):
        sae.W_dec.data.zero_()
    mean.b_dec.data = x.double().mean(0).float()
    r_zero, r_mean = _eval(model, [zero, mean], ids)
    assert r_zero["ce_spliced"] == pytest.approx(r_zero["ce_zero"], abs=1e-6)
    assert r_zero["frac_recovered"] == pytest.approx(0, abs=1e-5)
    assert r_zero["relative_norm"] == 0
    assert r_mean["ce_spliced"] == pytest.approx(r_mean["ce_mean"], abs=1e-6)
    assert r_mean["frac_recovered_mean"] == pytest.approx(0, abs=1e-5)
    assert r_mean["fvu"] == pytest.approx(1, abs=1e-5)
    assert r_mean["explained_variance"] == pytest.approx(0, abs=1e-5)
    assert r_zero["ce_zero"] != pytest.approx(r_zero["ce_clean"], abs=1e-3)  # the test can fail


def test_metrics_match_a_reference_computed_directly() -> None:
    model, ids, key = build_tiny("llama"), _sequences(), (1, "mlp_out")
    sae = _random(model, *key)
    sae.b_enc.data[:4] = 100.0  # always active: dense
    sae.b_enc.data[4:10] = -100.0  # never active: dead
    sae.W_enc.data[:, :10] = 0.0
    (r,) = _eval(model, [sae], ids)
    x = collect(model, ids, [key])[key][~torch.isin(ids, torch.tensor(SPECIAL))].double()
    with torch.no_grad():
        z = sae.encode(x.float()).double()
        x_hat = sae.decode(z.float()).double()
    res = x - x_hat
    tss = (x - x.mean(0)).pow(2).sum()
    fired = (z != 0).sum(0)
    density = fired[fired > 0].double() / len(x)
    assert r["tokens"] == len(x) == 6 * 16 - 6 - 1
    assert r["fvu"] == pytest.approx(float(res.pow(2).sum() / tss), rel=1e-5)
    assert r["mse"] == pytest.approx(float(res.pow(2).mean()), rel=1e-5)
    assert r["explained_variance"] == pytest.approx(
        float(1 - (res - res.mean(0)).pow(2).sum() / tss), rel=1e-5
    )
    assert r["cosine"] == pytest.approx(float(F.cosine_similarity(x, x_hat).mean()), rel=1e-5)
    assert r["relative_norm"] == pytest.approx(float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()))
    l0 = (z != 0).sum(-1).double()
    assert r["l0"] == pytest.approx(float(l0.mean())) and r["l0_std"] == pytest.approx(
        float(l0.std(unbiased=False))
    )
    assert r["l0_quantiles"]["p50"] == pytest.approx(float(l0.median()), abs=0.5)
    assert r["dead"] == int((fired == 0).sum()) >= 6
    assert r["dense"] == int((fired > 0.1 * len(x)).sum()) >= 4
    expected, _ = np.histogram(np.log10(density.numpy()), bins=r["density_hist"]["log10_edges"])
    assert r["density_hist"]["counts"] == expected.tolist()
    assert sum(r["density_hist"]["counts"]) == 48 - r["dead"]


def test_clean_loss_is_the_models_own_on_scored_positions() -> None:
    model, ids = build_tiny("gemma2"), _sequences()
    ids[3, 12:] = 0  # right padding: padded labels must not count
    (r,) = _eval(model, [_identity(model, 0, "resid_post")], ids)
    with torch.no_grad():
        logits = model(ids, attention_mask=(ids != 0).long()).logits[:, :-1]
    scored = ~torch.isin(ids[:, :-1], torch.tensor(SPECIAL)) & (ids[:, 1:] != 0)
    ce = F.cross_entropy(logits[scored], ids[:, 1:][scored])
    assert r["loss_tokens"] == int(scored.sum())
    assert r["ce_clean"] == pytest.approx(float(ce), rel=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])  # gemma2 soft-caps its logits
def test_chunked_cross_entropy_equals_unchunked(family: str) -> None:
    model, ids = build_tiny(family), _sequences()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, :-1].reshape(-1, model_info(model).d_model)
        got = token_losses(model, hidden, ids[:, 1:].reshape(-1), chunk=7)
    want = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none"
    )
    assert_close(got, want)


def test_many_saes_at_once_equal_one_at_a_time() -> None:
    model, ids = build_tiny("gemma3"), _sequences(n=7)
    saes = [
        _random(model, 1, "resid_post", "jumprelu", seed=1),
        _random(model, 1, "resid_post", "relu", seed=2),  # same site: one clean read, one ablation
        _random(model, 1, "mlp_out", "topk", seed=3),  # same layer, another site
        _random(model, 0, "attn_z", "batchtopk", seed=4),
        _random(model, 2, "resid_pre", "jumprelu", seed=5),
    ]
    together = _eval(model, saes, ids)
    for sae, joint in zip(saes, together, strict=True):
        (alone,) = _eval(model, [sae], ids)
        assert joint.keys() == alone.keys()
        for name in FLOATS:
            assert joint[name] == pytest.approx(alone[name], rel=1e-6, abs=1e-7), name
        assert (joint["dead"], joint["dense"], joint["tokens"]) == (
            alone["dead"], alone["dense"], alone["tokens"],
        )  # fmt: skip
    assert len({r["ce_spliced"] for r in together}) == len(saes)  # each SAE really was spliced


def test_batchtopk_is_scored_per_token_and_its_mode_restored() -> None:
    model, ids = build_tiny("gemma3"), _sequences()
    sae = _random(model, 1, "resid_post", "batchtopk").train()
    (r,) = _eval(model, [sae], ids)
    assert sae.training
    (again,) = _eval(model, [sae.eval()], ids)
    assert r["l0"] == again["l0"] and r["fvu"] == again["fvu"]


@pytest.mark.parametrize("ablations", [True, False])
def test_progress_bar_counts_every_forward(
    monkeypatch: pytest.MonkeyPatch, ablations: bool
) -> None:
    bars: list[Any] = []

    class Recording(progress_module.tqdm):  # type: ignore[misc,name-defined]
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            bars.append(self)

    monkeypatch.setattr(progress_module, "tqdm", Recording)
    model = build_tiny("gemma3")
    saes = [_random(model, 1, "resid_post", seed=1), _random(model, 0, "mlp_out", seed=2),
            _random(model, 1, "resid_post", seed=3)]  # fmt: skip
    _eval(model, saes, _sequences(n=7), ablations=ablations)  # batches of 4: two batches
    (bar,) = bars
    # per batch: the means pass and 3 ablations x 2 sites (with ablations), the clean one, 3 SAEs
    assert bar.n == bar.total == 2 * (4 + (7 if ablations else 0))


def test_without_ablations_loss_fields_are_none() -> None:
    model = build_tiny("gemma3")
    (r,) = _eval(model, [_random(model, 1, "resid_post")], _sequences(), ablations=False)
    assert r["ce_zero"] is None and r["ce_mean"] is None and r["frac_recovered"] is None
    assert r["delta_lm_loss"] is not None


def test_evaluate_reads_the_corpus_and_counts_tokens(tmp_path: Path) -> None:
    model, tok = build_tiny("llama"), tiny_tokenizer()
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(3, VOCAB, 30)) for _ in range(20)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (r,) = evaluate(model, tok, [_random(model, 1, "resid_post")], corpus=str(corpus), split="all",
                    tokens=100, context_size=16, batch_size=3)  # fmt: skip
    assert r["tokens"] + 7 + 3 == 7 * 16  # 7 sequences; 7 BOS, 3 EOS within the first 105 tokens
    with pytest.raises(ValueError, match=r"holds 656 tokens .* fewer than the 10,000 asked"):
        evaluate(model, tok, [_random(model, 1, "resid_post")], corpus=str(corpus), split="all",
                 tokens=10_000, context_size=16)  # fmt: skip


def _relu_gpt2() -> Any:
    """A tiny GPT-2 whose MLPs are ReLU: each one is exactly a relu transcoder (`_mlp_transcoder`)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                        activation_function="relu", initializer_range=0.1, bos_token_id=2,
                        eos_token_id=1, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def _mlp_transcoder(model: Any, layer: int, skip: torch.Tensor | None = None) -> SAE:
    """`mlp_in -> mlp_out` transcoder equal to the MLP: pre = x W_fc + b_fc, out = relu(pre) W_proj
    + b_proj (GPT-2's Conv1D weights are already [in, out]); a `skip` is added on top."""
    mlp = model.transformer.h[layer].mlp
    d, m = mlp.c_fc.weight.shape
    cfg = SAEConfig("relu", d_in=d, d_sae=m, layer=layer, site="mlp_in", target_site="mlp_out",
                    skip_connection=skip is not None)  # fmt: skip
    arrays = {"W_enc": mlp.c_fc.weight, "b_enc": mlp.c_fc.bias, "W_dec": mlp.c_proj.weight,
              "b_dec": mlp.c_proj.bias, **({"W_skip": skip} if skip is not None else {})}  # fmt: skip
    return SAE.from_arrays(cfg, arrays)


def test_a_transcoder_equal_to_the_mlp_is_lossless() -> None:
    model, ids = _relu_gpt2(), _sequences()
    exact = [_mlp_transcoder(model, layer) for layer in range(3)]
    for r in _eval(model, exact, ids):
        assert (r["site"], r["target_site"]) == ("mlp_in", "mlp_out")
        assert r["delta_lm_loss"] == pytest.approx(0, abs=1e-5)
        assert r["fvu"] == pytest.approx(0, abs=1e-10)
        assert r["frac_recovered"] == pytest.approx(1, abs=1e-4)
        assert abs(r["ce_zero"] - r["ce_clean"]) > 1e-3  # zero-ablating the MLP changes the loss


def test_transcoder_splices_replace_the_mlp_output() -> None:
    """A skip transcoder's score against a splice written by hand (`hooks.splice` with a source)."""
    from gemmascope.hooks import splice

    model, ids = _relu_gpt2(), _sequences()
    g = torch.Generator().manual_seed(3)
    tc = _mlp_transcoder(model, 1, skip=torch.randn(32, 32, generator=g) * 0.1)
    with torch.no_grad():
        tc.W_dec.mul_(0.5)  # no longer exact: the skip and half the latents
    zero = _mlp_transcoder(model, 1)
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_dec.zero_()
    r, r_zero = _eval(model, [tc, zero], ids)
    keep = ~torch.isin(ids, torch.tensor(SPECIAL))
    x, y = (collect(model, ids, [(1, s)])[1, s][keep] for s in ("mlp_in", "mlp_out"))
    with torch.no_grad():
        y_hat = tc(x)
        assert_close(y_hat, tc.decode(tc.encode(x)) + x @ tc.W_skip)
    fvu = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert r["fvu"] == pytest.approx(fvu, rel=1e-5)

    def spliced(
        ids: torch.Tensor,
    ) -> float:  # the model with MLP 1 replaced, special positions clean
        clean = collect(model, ids, [(1, "mlp_out")])[1, "mlp_out"]

        def fn(x_in: torch.Tensor) -> torch.Tensor:
            out = clean.clone()
            out[keep] = tc(x_in[keep])
            return out

        with torch.no_grad(), splice(model, 1, "mlp_out", fn, source="mlp_in"):
            logits = model(ids).logits[:, :-1]
        scored = keep[:, :-1]
        return float(F.cross_entropy(logits[scored], ids[:, 1:][scored]))

    assert r["ce_spliced"] == pytest.approx(spliced(ids), rel=1e-5)
    assert r_zero["ce_spliced"] == pytest.approx(r_zero["ce_zero"], abs=1e-6)  # the MLP ablated
    assert abs(r["delta_lm_loss"]) > 1e-3  # the splice changed the loss: the check can fail


def test_errors_name_the_sae_and_the_fix() -> None:
    model, ids = build_tiny("gemma3"), _sequences()
    nowhere = SAE(SAEConfig("relu", d_in=32, d_sae=8))
    with pytest.raises(ValueError, match=r"saes\[0\] .* does not say which layer and site"):
        _eval(model, [nowhere], ids)
    wide = SAE(SAEConfig("relu", d_in=40, d_sae=8, layer=1, site="resid_post"))
    with pytest.raises(ValueError, match=r"has d_in=40 but layer 1 resid_post .* is 32 wide"):
        _eval(model, [_identity(model, 0, "resid_post"), wide], ids)
    backwards = SAE(SAEConfig("relu", d_in=32, d_sae=8, layer=1, site="mlp_out",
                              target_site="mlp_in"))  # fmt: skip
    with pytest.raises(ValueError, match="its target site mlp_in comes before what it reads"):
        _eval(model, [backwards], ids)
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        _eval(model, [SAE(SAEConfig("relu", d_in=32, d_sae=8, layer=5, site="resid_post"))], ids)
    with pytest.raises(ValueError, match="`saes` is empty"):
        _eval(model, [], ids)
    with pytest.raises(ValueError, match="share one length"):
        _eval(model, [_identity(model, 0, "resid_post")], [ids[0], ids[1, :5]])


def test_results_file_round_trip_and_sources(tmp_path: Path) -> None:
    model = build_tiny("gemma3")
    for i in range(2):
        gemmascope.save(_random(model, i, "resid_post"), tmp_path / "run" / f"sae_{i}")
    gemmascope.save(_random(model, 0, "resid_post", "relu"), tmp_path / "one.npz", format="npz")
    pairs = expand_sources([str(tmp_path / "run"), str(tmp_path / "one.npz")])
    assert pairs == [(str(tmp_path / "run"), "sae_0"), (str(tmp_path / "run"), "sae_1"),
                     (str(tmp_path / "one.npz"), None)]  # fmt: skip
    assert expand_sources(["repo"], ["a", "b"]) == [("repo", "a"), ("repo", "b")]
    records = [{"layer": 1, "fvu": 0.5}]
    write_results(tmp_path / "r.json", records, {"tokens": 10})
    assert read_results(tmp_path / "r.json") == records
    (tmp_path / "bad.json").write_text('{"results": []}')
    with pytest.raises(ValueError, match="not a gemmascope evaluation file"):
        read_results(tmp_path / "bad.json")


def test_cli_eval_writes_results(tmp_path: Path, tiny_folder: Path) -> None:
    from gemmascope.cli import app

    model = build_tiny("llama")
    gemmascope.save(_random(model, 1, "resid_post"), tmp_path / "run" / "sae_a")
    gemmascope.save(_random(model, 2, "mlp_out", "topk"), tmp_path / "run" / "sae_b")
    corpus = tmp_path / "doc.txt"
    corpus.write_text(" ".join(f"w{i % 60 + 3}" for i in range(400)))
    out = tmp_path / "results.json"
    args = ["eval", str(tmp_path / "run"), "--model", str(tiny_folder), "--corpus", str(corpus),
            "--split", "all", "--tokens", "64", "--context-size", "16", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = read_results(out)
    assert [(r["sae_id"], r["site"], r["tokens"]) for r in records] == [
        ("sae_a", "resid_post", 4 * 15), ("sae_b", "mlp_out", 4 * 15),
    ]  # fmt: skip
    assert records[0]["source"] == str(tmp_path / "run") and records[0]["model"] == str(tiny_folder)
    bad = CliRunner().invoke(app, [*args[:-2], "--out", str(out), "--tokens", "1M"])
    assert bad.exit_code == 2 and "fewer than the 1,000,000 asked" in bad.output


@pytest.mark.slow
def test_gemma_3_270m_layer_6() -> None:
    from gemmascope.models import load_model

    model, tok = load_model("gemma-3-270m")
    saes = [_identity(model, 6, "resid_post"), _random(model, 6, "resid_post")]
    saes[1].W_dec.data /= 10  # a random SAE of a sensible scale; any finite numbers will do
    ident, rand = evaluate(model, tok, saes, tokens=1024, context_size=256, batch_size=4)
    assert ident["delta_lm_loss"] == pytest.approx(0, abs=1e-5) and ident["fvu"] == 0
    assert 1 < ident["ce_clean"] < 6 and ident["ce_zero"] > ident["ce_clean"] + 1
    for name in FLOATS:
        assert np.isfinite(rand[name]), name
    assert rand["tokens"] > 900 and rand["delta_lm_loss"] > 0


def test_a_clt_is_scored_layer_by_layer_against_a_splice_by_hand() -> None:
    """Each layer of a CLT replaces that layer's MLP with what every earlier layer's latents (and
    its own) write there: its records against a hand-made splice of `clt(x)[..., layer, :]`."""
    from gemmascope.clt import CLT
    from gemmascope.evaluate.results import site_label
    from gemmascope.hooks import splice

    model, ids = _relu_gpt2(), _sequences()
    g = torch.Generator().manual_seed(4)
    L, d, m = 3, 32, 48
    cfg = SAEConfig("jumprelu", d_in=d, d_sae=m, layer=0, site="mlp_in", target_site="mlp_out",
                    skip_connection=True, n_layers=L)  # fmt: skip
    clt = CLT.from_arrays(cfg, {
        "W_enc": torch.randn(L, d, m, generator=g) * 0.3, "b_enc": torch.randn(L, m, generator=g) * 0.1,
        "threshold": torch.rand(L, m, generator=g) * 0.2, "b_dec": torch.randn(L, d, generator=g) * 0.1,
        "W_skip": torch.randn(L, d, d, generator=g) * 0.1,
        **{f"W_dec_{i}": torch.randn(m, L - i, d, generator=g) * 0.1 for i in range(L)},
    })  # fmt: skip
    records = _eval(model, [clt], ids)
    assert [r["layer"] for r in records] == [0, 1, 2]
    assert site_label(records[2]) == "mlp_in->mlp_out+skip CLT"
    keep = ~torch.isin(ids, torch.tensor(SPECIAL))
    acts = collect(model, ids, [(i, s) for i in range(L) for s in ("mlp_in", "mlp_out")])
    x = torch.stack([acts[i, "mlp_in"] for i in range(L)], -2)  # (B, T, L, d)
    with torch.no_grad():
        y_hat = clt(x)  # (B, T, L, d)
    for layer, r in enumerate(records):
        y, pred = acts[layer, "mlp_out"][keep], y_hat[..., layer, :][keep]
        fvu = float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert r["fvu"] == pytest.approx(fvu, rel=1e-5)

        def fn(x_in: torch.Tensor, layer: int = layer) -> torch.Tensor:
            out = acts[layer, "mlp_out"].clone()
            out[keep] = y_hat[..., layer, :][keep]
            return out

        with torch.no_grad(), splice(model, layer, "mlp_out", fn, source="mlp_in"):
            logits = model(ids).logits[:, :-1]
        scored = keep[:, :-1]
        ce = float(F.cross_entropy(logits[scored], ids[:, 1:][scored]))
        assert r["ce_spliced"] == pytest.approx(ce, rel=1e-5)
    assert records[2]["fvu"] != pytest.approx(records[1]["fvu"], rel=1e-3)  # the check can fail
