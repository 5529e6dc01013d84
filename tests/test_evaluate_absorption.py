"""Feature absorption: known answers on planted letter features, and SAEBench 0.6.0's own code on
the same activations, latents and probe."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from toolenv import saebench_module

from gemmascope.evaluate import absorption as A
from gemmascope.evaluate import spelling as W
from gemmascope.evaluate.saebench_files import absorption_output
from gemmascope.sae import SAE, SAEConfig

D = 64
KEY = (1, "resid_post")
S = A.LETTERS.index("s")


def _letter_sae(absorbed: int) -> SAE:
    """Latent c detects letter c (decoder e_c). Latents 26.. absorb "s" on one word each: word j of
    the absorbed ones carries e_{26+j}, which silences the "s" latent and fires latent 26+j at 2,
    whose decoder leans 0.8 on e_s. Decoder rows have norm 3: folded (SAEBench's view), the absorber
    carries 2 * 3 * 0.8 = 4.8 of the probe's 5; unfolded it would carry 1.6, under the 40% needed."""
    sae = SAE(SAEConfig("jumprelu", d_in=D, d_sae=26 + absorbed, layer=KEY[0], site=KEY[1]))
    with torch.no_grad():
        for c in range(26):
            sae.W_enc[c, c] = 1.0
            sae.W_dec[c, c] = 3.0
        for j in range(absorbed):
            sae.W_enc[26 + j, S] = -2.0  # the "s" latent goes silent on an absorbed word
            sae.W_enc[26 + j, 26 + j] = 0.5
            sae.W_dec[26 + j, S], sae.W_dec[26 + j, 26 + j] = 2.4, 1.8  # cos 0.8 with e_s
        sae.threshold.fill_(1.0)
    return sae


def _spelling(per_letter: int = 400, absorbed: int = 6, seed: int = 0) -> W.Spelling:
    """Words with activation 5 e_letter + noise outside the letters' and absorbers' dimensions;
    the first `absorbed` test words of "s" also carry 4 e_{26+j}."""
    g = torch.Generator().manual_seed(seed)
    letters = torch.arange(26).repeat_interleave(per_letter)  # (n,)
    train = (torch.arange(len(letters)) % per_letter) < per_letter * 3 // 4
    x = torch.zeros(len(letters), D)
    x[torch.arange(len(letters)), letters] = 5.0
    x[:, 26 + absorbed :] = torch.randn(len(letters), D - 26 - absorbed, generator=g)
    hit = torch.nonzero((letters == S) & ~train)[:absorbed, 0]
    x[hit, 26 + torch.arange(absorbed)] = 4.0
    words = [f"{A.LETTERS[c]}word{i}" for i, c in enumerate(letters.tolist())]
    return W.Spelling(words, letters, train, {KEY: x})


def _scores(data: W.Spelling, sae: SAE) -> dict[str, Any]:
    return A.score_sae(sae, data, A.letter_probe(data, KEY), len(data.words))


def test_planted_absorption_is_counted_exactly() -> None:
    absorbed = 6
    found = _scores(_spelling(absorbed=absorbed), _letter_sae(absorbed))
    assert min(found["probe_f1"].values()) == 1.0  # the letters are planted cleanly
    rows = {r["first_letter"]: r for r in found["details"]}
    assert len(rows) == 26
    s = rows["s"]
    assert s["num_probe_true_positives"] == 100 and s["num_split_features"] == 1
    assert s["num_full_absorption"] == absorbed  # each absorbed word, and nothing else
    assert s["full_absorption_rate"] == pytest.approx(absorbed / 100)
    assert s["mean_absorption_fraction"] == pytest.approx(absorbed / 100)
    for letter, r in rows.items():
        if letter != "s":
            assert r["mean_absorption_fraction"] == 0 and r["full_absorption_rate"] == 0, letter
    assert found["mean"]["mean_full_absorption_score"] == pytest.approx(absorbed / 100 / 26)


def test_a_perfect_letter_detector_absorbs_nothing() -> None:
    found = _scores(_spelling(absorbed=0), _letter_sae(0))
    assert found["mean"]["mean_absorption_fraction_score"] == 0
    assert found["mean"]["mean_full_absorption_score"] == 0
    assert found["mean"]["mean_num_split_features"] == 1


def test_word_absorption_partial_fraction() -> None:
    """a = 5 along the probe: the main latent carries 2, an absorber (cos 1) 2, so 2 / (2 + 2). A
    latent at cos 0.05 carrying 2.5 must not count (with it the answer would be 3/5)."""
    direction = torch.tensor([1.0, 0.0])
    cos = torch.tensor([1.0, 1.0, 0.05])  # main, absorber, a latent too far from the probe
    x = torch.tensor([[5.0, 0.0]])
    z = torch.tensor([[2.0, 2.0, 50.0]])
    fraction, full = A.word_absorption(x, z, direction, cos, [0])
    assert fraction.item() == pytest.approx(0.5) and not full.item()  # the main latent fired


def test_the_spelling_vocabulary_is_single_token_words_of_letters() -> None:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "<pad>": 0,
        "<bos>": 1,
        "\u2581cat": 2,
        "dog": 3,
        "x1": 4,
        "\u2581": 5,
        "é": 6,
        "Ab": 7,
    }
    inner = Tokenizer(models.WordLevel(vocab, "<pad>"))
    inner.decoder = decoders.Metaspace()  # as SentencePiece tokenizers (Gemma's) decode
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", bos_token="<bos>")
    assert W.spelling_vocab(tok) == [(" cat", 2), ("dog", 3), ("Ab", 7)]


# ---------------------------------------------------------------- against SAEBench's own code
@pytest.fixture(scope="module")
def saebench() -> SimpleNamespace:
    absorption = "sae_bench.evals.absorption"
    return SimpleNamespace(
        calc=saebench_module(f"{absorption}.feature_absorption_calculator"),
        ksp=saebench_module(f"{absorption}.k_sparse_probing"),
        probing=saebench_module(f"{absorption}.probing"),
        Output=saebench_module(f"{absorption}.eval_output").AbsorptionEvalOutput,
    )


def test_word_absorption_equals_saebench_calculator(saebench: SimpleNamespace) -> None:
    """SAEBench's `FeatureAbsorptionCalculator` on the same activations (a model that returns them
    for each word's prompt), the same folded SAE and probe direction: the same fraction and verdict
    for every word, over random data that hits each branch."""
    g = torch.Generator().manual_seed(5)
    m, d, F = 200, 16, 48
    x = torch.randn(m, d, generator=g) + 2.0  # mostly positive along the probe
    z = torch.relu(torch.randn(m, F, generator=g) * 2 - 1.5)
    z[:60, :2] = 0  # main latents silent: full absorption possible
    W_dec = torch.nn.functional.normalize(torch.randn(F, d, generator=g), dim=1)
    direction = torch.randn(d, generator=g)
    W_dec[2:8] = W_dec[2:8] * 0.5 + direction / direction.norm()  # aligned absorbers
    W_dec = torch.nn.functional.normalize(W_dec, dim=1)
    words = [f"word{i}" for i in range(m)]
    row = {w: i for i, w in enumerate(words)}

    class Model:
        tokenizer = object()

        def run_with_cache(self, bases: list[str], names_filter: list[str]) -> Any:
            rows = [row[b.rsplit("\n", 1)[-1]] for b in bases]
            return None, {names_filter[0]: x[rows][:, None, :]}  # (B, 1, d)

        def to_tokens(self, base: str) -> torch.Tensor:
            return torch.zeros(1, 3)

    sae = SimpleNamespace(
        W_dec=W_dec, device="cpu", encode=lambda acts: z[[_find(x, a) for a in acts]]
    )
    calculator = saebench.calc.FeatureAbsorptionCalculator(
        model=Model(), icl_word_list=words, max_icl_examples=2, base_template="{word}",
        word_token_pos=-1, batch_size=32, topk_feats=10,
    )  # fmt: skip
    theirs = calculator.calculate_absorption(
        sae, words, direction, [0, 1], layer=0, show_progress=False
    )
    cos = torch.nn.functional.cosine_similarity(direction[None], W_dec, dim=-1)
    fraction, full = A.word_absorption(x, z, direction, cos, [0, 1])
    want_fraction = torch.tensor([float(r.absorption_fraction) for r in theirs.word_results])
    want_full = torch.tensor([r.is_full_absorption for r in theirs.word_results])
    assert torch.allclose(fraction, want_fraction, atol=1e-5)
    assert torch.equal(full, want_full)
    assert 0 < int(full.sum()) < m and 0 < int((fraction > 0).sum()) and int((fraction < 1).sum())


def _find(x: torch.Tensor, a: torch.Tensor) -> int:
    return int((x - a).abs().sum(1).argmin())


def test_main_latents_equal_saebench_feature_splitting(saebench: SimpleNamespace) -> None:
    import pandas as pd

    g = torch.Generator().manual_seed(2)
    rows, ours = [], {}
    for letter in A.LETTERS:  # F1 per k that rise by more or less than the 0.03 jump
        scores = (torch.rand(A.MAX_K, generator=g) * 0.08 + 0.01).cumsum(0).tolist()
        ids = [torch.randperm(100, generator=g)[:k] for k in range(1, A.MAX_K + 1)]
        ours[letter] = A.main_latents(ids, scores)
        rows.append({"letter": letter, **{f"f1_sparse_sae_{k}": s for k, s in enumerate(scores, 1)},
                     **{f"sparse_sae_k_{k}_feats": i.numpy() for k, i in enumerate(ids, 1)}})  # fmt: skip
    df = pd.DataFrame(rows)
    saebench.ksp.add_feature_splits_to_metrics_df(
        df, max_k_value=A.MAX_K, f1_jump_threshold=A.F1_JUMP
    )
    for letter, split in ours.items():
        assert list(df[df["letter"] == letter]["split_feats"].iloc[0]) == split, letter
    assert len({len(v) for v in ours.values()}) > 2  # splits of several sizes were compared


def test_k_sparse_probes_equal_saebench(saebench: SimpleNamespace) -> None:
    """SAEBench's `train_k_sparse_probes` on the same folded latents: the same latent per letter at
    k = 1 and, refit on it, the same scikit-learn probe."""
    data, sae = _spelling(absorbed=0), _letter_sae(0)
    x, y = data.acts[KEY][data.train], data.letters[data.train]
    ours = A.k_sparse_probes(A._latents(sae, x), y, max_k=1, batch_size=1024)
    shim = SimpleNamespace(device="cpu", dtype=torch.float32, cfg=SimpleNamespace(d_sae=26),
                           encode=lambda a: sae.encode(a) * sae.W_dec.norm(dim=1))  # fmt: skip
    torch.manual_seed(0)
    theirs = saebench.ksp.train_k_sparse_probes(
        shim, [(w, c) for w, c, t in zip(data.words, data.letters.tolist(), data.train.tolist(),
                                         strict=True) if t],
        x, ks=[1], precalc_sae_acts=True, batch_size=1024,
    )  # fmt: skip
    for c in range(26):
        ids, w, b = ours[c][0]
        probe = theirs[1][c]
        assert ids.tolist() == probe.feature_ids.tolist() == [c]
        assert torch.allclose(w, probe.weight, rtol=1e-4) and b == pytest.approx(
            float(probe.bias), rel=1e-4
        )


def test_letter_probe_matches_saebench_training(saebench: SimpleNamespace) -> None:
    """Our probe and SAEBench's `train_multi_probe` on the same noisy letters: the same test F1 per
    letter to within sampling noise (the shuffles differ)."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 26, (6000,), generator=g)
    x = torch.randn(6000, 40, generator=g)
    x[torch.arange(6000), y] += 2.5  # a noisy letter code
    tr = torch.arange(6000) < 4800
    w, b = A.fit_probe(x[tr], y[tr], batch_size=512)
    ours = [A.f1(y[~tr] == c, (x[~tr] @ w.T + b)[:, c] > 0) for c in range(26)]
    torch.manual_seed(0)
    probe = saebench.probing.train_multi_probe(
        x[tr], torch.nn.functional.one_hot(y[tr], 26), num_probes=26, batch_size=512,
        num_epochs=50, lr=1e-2, weight_decay=1e-4, show_progress=False, device=torch.device("cpu"),
    )  # fmt: skip
    with torch.no_grad():
        theirs = [A.f1(y[~tr] == c, probe(x[~tr])[:, c] > 0) for c in range(26)]
    assert 0.15 < sum(ours) / 26 < 0.95  # neither trivial nor hopeless
    assert abs(sum(ours) - sum(theirs)) / 26 < 0.02
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 0.08


def test_result_file_validates_with_saebench_class(saebench: SimpleNamespace) -> None:
    from pydantic import TypeAdapter

    found = _scores(_spelling(absorbed=6), _letter_sae(6))
    record = {
        "model": "tiny",
        "source": "runs/demo",
        "sae_id": "layer_1",
        "saebench": {"absorption": found},
    }
    data = json.loads(json.dumps(absorption_output(record, {"absorption_words": 10400})))
    out = TypeAdapter(saebench.Output).validate_python(data)
    assert out.eval_type_id == "absorption_first_letter" and len(out.eval_result_details) == 26
    assert out.eval_result_metrics.mean.mean_full_absorption_score == pytest.approx(6 / 100 / 26)


# ---------------------------------------------------------------- through evaluate and the CLI
WORDS = 400


def _letters_tokenizer() -> Any:
    """A word-level tokenizer of `WORDS` ids whose words are two letters."""
    from conftest import tiny_tokenizer

    return tiny_tokenizer([a + b for a in A.LETTERS for b in A.LETTERS][: WORDS - 3])


def _letters_model() -> Any:
    """A tiny random Gemma 3 over the `WORDS` ids of `_letters_tokenizer`."""
    from conftest import BUILDERS
    from transformers import AutoModelForCausalLM

    config = BUILDERS["gemma3"]()
    config.vocab_size, config._attn_implementation = WORDS, "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def _tiny_saes(model: Any) -> tuple[SAE, SAE]:
    """A lossless ReLU SAE at layer 0 `resid_post`, and an MLP transcoder of layer 0."""
    from gemmascope.models import model_info

    info = model_info(model)
    d = info.site_width("resid_post")
    sae = SAE(SAEConfig("relu", d_in=d, d_sae=2 * d, layer=0, site="resid_post"))
    sae.W_enc.data = torch.cat([torch.eye(d), -torch.eye(d)], 1)
    sae.W_dec.data = torch.cat([torch.eye(d), -torch.eye(d)], 0)
    cfg = SAEConfig("relu", d_in=info.site_width("mlp_in"), d_sae=16, layer=0, site="mlp_in",
                    target_site="mlp_out")  # fmt: skip
    return sae, SAE(cfg)


def test_absorption_in_evaluate_on_a_tiny_model(tmp_path: Path) -> None:
    """The whole path on a random model: prompts, forwards, probes. Its probes cannot spell, so the
    record says why there is no score, and no SAEBench file is written for it."""
    from gemmascope.evaluate import EvalConfig, evaluate, write_saebench

    model, tok = _letters_model(), _letters_tokenizer()
    sae, _ = _tiny_saes(model)
    corpus = tmp_path / "doc.txt"
    corpus.write_text(" ".join(["ab cd ef"] * 100))
    cfg = EvalConfig(corpus=str(corpus), split="all", tokens=32, context_size=16,
                     evals=["core", "absorption"], absorption_words=200)  # fmt: skip
    (r,) = evaluate(model, tok, [sae], cfg, progress=False)
    found = r["saebench"]["absorption"]
    assert found["mean"] == {} and "first-letter probes" in found["reason"]
    assert len(found["probe_f1"]) == 26
    r.update(source=str(tmp_path / "run"), sae_id="a")
    paths = write_saebench(tmp_path / "bench", [r], {}, [sae.cfg.to_dict()])
    assert [p.parent.name for p in paths] == ["core"]


def test_a_tokenizer_that_cannot_spell_is_refused_before_any_forward(no_forward: None) -> None:
    from conftest import build_tiny, tiny_tokenizer

    from gemmascope.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(evals=["core", "absorption"], context_size=16)
    with pytest.raises(ValueError, match="single-token words of letters"):
        evaluate(build_tiny("llama"), tiny_tokenizer(), [], cfg, progress=False)


def test_spelling_prompts_point_at_each_word() -> None:
    tok = _letters_tokenizer()
    prompts, positions, words, train = W.spelling_prompts(tok, 300)
    vocab = tok.get_vocab()
    tail = tok(W.TEMPLATE, add_special_tokens=False)["input_ids"]
    seen = {True: set(), False: set()}
    for p, at, ws, split in zip(prompts, positions, words, train, strict=True):
        assert 1 <= len(ws) <= W.WORDS_PER_PROMPT and p[0] == tok.bos_token_id
        assert [p[i] for i in at] == [vocab[w] for w in ws]  # each position holds its word
        assert at[-1] == len(p) - 1  # cut after the last word
        for i, w in zip(at[:-1], ws[:-1], strict=True):  # then the template and the answer
            answer = tok(" " + w[0].upper(), add_special_tokens=False)["input_ids"]
            assert p[i + 1 : i + 1 + len(tail) + len(answer)] == tail + answer
        seen[split] |= set(ws)
    assert len(seen[True]) == 240 and len(seen[False]) == 60 and not seen[True] & seen[False]


def test_absorption_scores_every_sae_of_a_tiny_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saebench: SimpleNamespace
) -> None:
    """With the probe bar lowered (a random model cannot spell), the scored path runs for an SAE,
    a transcoder gets no result, and SAEBench's absorption file is written and validates."""
    from pydantic import TypeAdapter

    from gemmascope.evaluate import EvalConfig, write_saebench

    monkeypatch.setattr(A, "MIN_LETTERS", 1)
    monkeypatch.setattr(A, "MIN_PROBE_F1", -1.0)
    model, tok = _letters_model(), _letters_tokenizer()
    sae, transcoder = _tiny_saes(model)
    cfg = EvalConfig(absorption_words=300, batch_size=2, context_size=64)
    found, none = A.absorption(model, tok, [sae, transcoder], cfg, progress=False)
    assert none is None
    assert 10 <= len(found["details"]) <= 16  # the letters its 397 two-letter words start with
    assert set(found["mean"]) >= {"mean_absorption_fraction_score", "std_dev_full_absorption_score"}
    assert sum(r["num_probe_true_positives"] for r in found["details"]) > 0
    record = {"model": "tiny", "source": str(tmp_path / "run"), "sae_id": "a",
              "saebench": {"core": {}, "absorption": found}}  # fmt: skip
    (core, path) = write_saebench(tmp_path / "bench", [record], {}, [sae.cfg.to_dict()])
    assert path.parent.name == "absorption"
    out = TypeAdapter(saebench.Output).validate_python(json.loads(path.read_text()))
    assert out.eval_config.max_k_value == A.MAX_K and out.eval_result_unstructured["words"] == 300
