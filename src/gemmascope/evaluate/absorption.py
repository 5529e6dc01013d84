"""Feature absorption, SAEBench's `absorption_first_letter` eval, in the model's own forwards.

A word that starts with "s" should light the SAE's "starts with s" latent. Absorption is when it
does not, and a more specific latent (say "short") carries the first-letter direction instead. The
steps are SAEBench's (David Chanin's metric, Demian Till's absorption fraction):

1. Prompts `{word} has the first letter: {LETTER}` (words: single tokens of letters only, one leading
   space allowed, SAEBench's `get_alpha_tokens`) with the words of the same split as in-context
   examples; the activation at each word's token, at the site the SAE reads (`spelling`).
2. A one-vs-rest logistic probe per letter (SAEBench's `train_multi_probe`); a letter counts when
   its probe's test F1 exceeds 0.6, and at least 20 letters must count.
3. Per SAE: k-sparse probes on the latents (k = 1..10); a letter's main latents are the largest k
   whose test F1 still rose by more than 0.03 at each step (feature splitting).
4. For each test word of a letter that the probe detects: the probe direction's projection of the
   activation, a, and of each latent of the folded SAE (`saebench.decoder_fold`), act_i *
   cos(probe, W_dec[i]). The absorption fraction is the share of a carried by up to 3 other
   latents (cos >= 0.1) once the main latents fall short, if they carry at least 40% of a; full
   absorption is when no main latent fires and the single top projecting latent (cos >= 0.025)
   carries at least 40% of a. Means per letter, then over letters.

Where ours differs from sae_bench 0.6.0, for cost on a CPU (docs/evaluation.md says why): every
word of a prompt of 11 is a sample, over `absorption_words` words, not the last word of a prompt over
the whole vocabulary; the probe trains with batches of 1,024, not 4,096; prompts are built from token
ids; the test words' activations are reused for step 4. Transcoders and CLT layers get no result.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gemmascope.evaluate.saebench import decoder_fold
from gemmascope.evaluate.spelling import LETTERS, SEED, TEMPLATE, Spelling, spelling_activations
from gemmascope.models import SiteKey

MAX_K = 10
F1_JUMP = 0.03
MIN_PROBE_F1 = 0.6
MIN_LETTERS = 20
FULL_COS = 0.025
FRACTION_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
PROBE_BATCH = 1024
EPS = 1e-8
PROBE_SECONDS_PER_LATENT = 2.8e-3
"""For plans: seconds of probes per latent per 20,000 words on this project's 2-core CPU (measured
by `bench/evaluate.py` on a 16k SAE at L0 ~50, 2026-12-07)."""


# ---------------------------------------------------------------- probes
def fit_probe(
    x: Tensor, y: Tensor, *, l1: float = 0.0, weight_decay: float = 1e-4, epochs: int = 50,
    batch_size: int = PROBE_BATCH, lr: float = 1e-2, end_lr: float = 1e-5, seed: int = SEED,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One-vs-rest logistic probes for 26 letters (SAEBench's `train_multi_probe`; with `l1`, its
    `train_sparse_multi_probe`): weights `[26, D]` and biases `[26]`. `x` `[n, D]` may be sparse."""
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    target = nn.functional.one_hot(y, len(LETTERS)).float()  # (n, 26)
    pos = target.sum(0)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(n - pos) / pos.clamp_min(1))
    bound = 1 / math.sqrt(d)  # nn.Linear's initialisation
    w = nn.Parameter((torch.rand(len(LETTERS), d, generator=g) * 2 - 1) * bound)
    b = nn.Parameter((torch.rand(len(LETTERS), generator=g) * 2 - 1) * bound)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, math.exp(math.log(end_lr / lr) / epochs))
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                xb = x.index_select(0, idx)
                logits = (torch.sparse.mm(xb, w.T) if xb.is_sparse else xb @ w.T) + b  # (B, 26)
                loss = loss_fn(logits, target[idx])
                if l1:
                    loss = loss + l1 * w.abs().sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    return w.detach(), b.detach()


@dataclass
class LetterProbe:
    """The first-letter probe of one site, fit on the training words, and its test scores."""

    w: Tensor  # [26, d]
    b: Tensor  # [26]
    logits: Tensor  # [n_test, 26]
    f1: list[float]  # per letter, on the test words


def letter_probe(data: Spelling, key: SiteKey) -> LetterProbe:
    x, y = data.acts[key], data.letters
    w, b = fit_probe(x[data.train], y[data.train])
    logits = x[~data.train] @ w.T + b  # (n_test, 26)
    y_test = y[~data.train]
    return LetterProbe(
        w, b, logits, [f1(y_test == c, logits[:, c] > 0) for c in range(len(LETTERS))]
    )


def f1(truth: Tensor, predicted: Tensor) -> float:
    """scikit-learn's binary F1 (0 when nothing is predicted or true)."""
    tp = int((truth & predicted).sum())
    denom = int(truth.sum()) + int(predicted.sum())
    return 2 * tp / denom if denom else 0.0


def columns(z: Tensor, ids: Tensor) -> Tensor:
    """Dense `[n, k]` columns `ids` of latents `z` `[n, F]`, sparse or not."""
    return z.index_select(1, ids).to_dense() if z.is_sparse else z[:, ids]


def k_sparse_probes(
    z: Tensor, y: Tensor, max_k: int = MAX_K, batch_size: int = PROBE_BATCH
) -> list[list[tuple[Tensor, Tensor, float]]]:
    """Per letter, per k = 1..max_k: (latent ids, weights, bias) of SAEBench's k-sparse probe: the k
    largest weights of an L1 probe (`fit_probe(l1=0.01)`), refit by scikit-learn's balanced
    logistic regression. A letter no training word starts with gets none."""
    from sklearn.linear_model import LogisticRegression

    w, _ = fit_probe(z, y, l1=0.01, weight_decay=1e-6, batch_size=batch_size)
    out = []
    for c in range(len(LETTERS)):
        rows = []
        for k in range(1, max_k + 1) if 0 < int((y == c).sum()) < len(y) else ():
            ids = w[c].topk(k).indices
            fit = LogisticRegression(max_iter=500, class_weight="balanced")
            fit.fit(columns(z, ids).numpy(), (y == c).numpy().astype(np.int64))
            rows.append((ids, torch.tensor(fit.coef_[0]).float(), float(fit.intercept_[0])))
        out.append(rows)
    return out


def main_latents(ids: list[Tensor], scores: list[float]) -> list[int]:
    """A letter's main latents from its k-sparse probes' latent ids and test F1 per k (SAEBench's
    feature splitting: grow k while the F1 rises by more than `F1_JUMP`)."""
    best, split = -100.0, []
    for latents, score in zip(ids, scores, strict=True):
        if score <= best + F1_JUMP:
            break
        best, split = score, latents.tolist()
    return split


# ---------------------------------------------------------------- absorption
def word_absorption(
    x: Tensor, z: Tensor, direction: Tensor, cos: Tensor, main: list[int]
) -> tuple[Tensor, Tensor]:
    """Absorption fraction `[m]` and full absorption `[m]` (bool) of m words (SAEBench's
    `FeatureAbsorptionCalculator`): activations `x` `[m, d]`, latents `z` `[m, F]`, the probe's
    direction `[d]`, cos(probe, decoder rows) `[F]`, the letter's main latents."""
    a = x @ (direction / direction.norm())  # (m,)
    proj = z * cos  # (m, F)
    main_proj = proj[:, main].sum(1)  # (m,)
    others = torch.ones_like(cos, dtype=torch.bool)
    others[main] = False
    absorbers = others & (cos >= FRACTION_COS)  # (F,)
    allowed = torch.where(absorbers & (proj > 0), proj, torch.zeros(()))  # (m, F)
    top = allowed.topk(min(MAX_ABSORBERS, allowed.shape[1]), dim=1).values.sum(1)  # (m,)
    absorbed = torch.minimum(top, a - main_proj)
    fraction = (absorbed / (absorbed + main_proj)).clamp(0, 1)
    fraction = torch.where(main_proj <= 0, torch.ones(()), fraction)
    fraction = torch.where(
        (main_proj >= a) | (top / a < PROJECTION_SHARE), torch.zeros(()), fraction
    )
    lead_proj, lead = proj.topk(1, dim=1)  # (m, 1)
    silent = (z[:, main] < EPS).all(1) if main else torch.ones_like(a, dtype=torch.bool)
    full = (
        silent
        & (cos[lead[:, 0]] >= FULL_COS)
        & (a >= 0)
        & (lead_proj[:, 0] / a >= PROJECTION_SHARE)
    )
    return fraction, full


def absorption_scores(sae: Any, data: Spelling, probe: LetterProbe) -> dict[str, Any]:
    """SAEBench's absorption metrics of one SAE on `data`, given its site's letter probe."""
    x = data.acts[sae.cfg.layer, sae.cfg.site]
    train, test = data.train, ~data.train
    x_test = x[test]
    z_train = _latents(sae, x[train])
    z_test = _latents(sae, x_test)
    y_test = data.letters[test]
    probes = k_sparse_probes(z_train, data.letters[train])
    w_dec = sae.W_dec.detach()
    unit = nn.functional.normalize(probe.w.to(w_dec.device, w_dec.dtype), dim=1)  # (26, d)
    cos_all = (nn.functional.normalize(w_dec, dim=1) @ unit.T).float().cpu()  # (F, 26)
    rows = []
    for c, letter in enumerate(LETTERS):
        if probe.f1[c] <= MIN_PROBE_F1 or not probes[c]:
            continue
        truth = y_test == c
        k_f1 = [f1(truth, columns(z_test, ids) @ wk + bk > 0) for ids, wk, bk in probes[c]]
        split = main_latents([ids for ids, _, _ in probes[c]], k_f1)
        detected = truth & (probe.logits[:, c] > 0)
        m = int(detected.sum())
        if m == 0:  # no word to measure (an F1 above MIN_PROBE_F1 implies some)
            continue
        cos = cos_all[:, c]  # (F,)
        idx = detected.nonzero()[:, 0]
        fraction, full = word_absorption(
            x_test[idx], z_test.index_select(0, idx).to_dense(), probe.w[c], cos, split
        )
        rows.append({
            "first_letter": letter,
            "mean_absorption_fraction": float(fraction.sum()) / m,
            "full_absorption_rate": float(full.sum()) / m,
            "num_full_absorption": int(full.sum()), "num_probe_true_positives": m,
            "num_split_features": len(split), "probe_f1": probe.f1[c], "k_sparse_f1": k_f1,
        })  # fmt: skip
    means = {
        name: [r[field] for r in rows]
        for name, field in (("absorption_fraction_score", "mean_absorption_fraction"),
                            ("full_absorption_score", "full_absorption_rate"),
                            ("num_split_features", "num_split_features"))
    }  # fmt: skip
    metrics = {f"mean_{k}": statistics.mean(v) for k, v in means.items()} if rows else {}
    if len(rows) > 1:
        metrics |= {f"std_dev_{k}": statistics.stdev(v) for k, v in means.items()}
    return {"mean": metrics, "details": rows}


def _latents(sae: Any, x: Tensor, chunk: int = 1024) -> Tensor:
    """The latents of `x` `[n, d]` of the SAE as SAEBench evaluates it (`saebench.decoder_fold`:
    latent i times ||W_dec[i]|| in the activations' units), as a sparse COO tensor `[n, F]`."""
    w_dec = sae.W_dec.detach() * sae.cfg.input_scale  # (F, d)
    fold = decoder_fold(w_dec, sae.cfg.architecture)
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            z = sae.encode(x[i : i + chunk].to(w_dec.device, w_dec.dtype))  # (c, F)
            if fold is not None:
                z = z * fold.to(z.dtype)
            parts.append(z.float().to_sparse().cpu())
    return torch.cat(parts).coalesce()


def absorption(
    model: nn.Module, tokenizer: Any, items: Sequence[Any], cfg: Any, *, progress: bool = True
) -> list[dict[str, Any] | None]:
    """SAEBench's absorption metrics per item (an SAE, or a layer of a CLT as `passes.per_layer`
    gives them), with `cfg` an `EvalConfig`. None for an item it does not apply to (a transcoder or
    a CLT layer); `{"mean": {}, "reason": ...}` where too few letters have a good probe."""
    usable = [s for s in items if _reconstructs(s)]
    keys = sorted({(s.cfg.layer, s.cfg.site) for s in usable})
    if not keys:
        return [None] * len(items)
    data = spelling_activations(model, tokenizer, keys, n_words=cfg.absorption_words,
                                batch_size=prompts_per_batch(cfg), progress=progress)  # fmt: skip
    probes = {key: letter_probe(data, key) for key in keys}
    return [
        score_sae(sae, data, probes[sae.cfg.layer, sae.cfg.site], cfg.absorption_words)
        if _reconstructs(sae) else None
        for sae in items
    ]  # fmt: skip


def prompts_per_batch(cfg: Any) -> int:
    """Prompts (~90 tokens) per forward: as many tokens as an evaluation batch of `cfg` holds."""
    return max(1, cfg.batch_size * cfg.context_size // 96)


def _reconstructs(sae: Any) -> bool:
    """An SAE that writes what it reads (not a transcoder, not a layer of a CLT)."""
    return sae.cfg.target_site is None and not hasattr(sae, "clt")


def score_sae(sae: Any, data: Spelling, probe: LetterProbe, words: int) -> dict[str, Any]:
    """One SAE's absorption result: its scores, or the reason there are none (too few letters with
    a good probe), with the probe's F1 per letter and the settings in SAEBench's names."""
    key = (sae.cfg.layer, sae.cfg.site)
    good = sum(f > MIN_PROBE_F1 for f in probe.f1)
    found: dict[str, Any] = {"mean": {}, "details": []}
    if good < MIN_LETTERS:
        found["reason"] = (
            f"only {good} of 26 first-letter probes at layer {key[0]} {key[1]} reach test F1 "
            f"{MIN_PROBE_F1}; SAEBench needs {MIN_LETTERS} (try more --absorption-words, or a "
            "layer or model that spells better)"
        )
    else:
        with torch.no_grad():
            found = absorption_scores(sae, data, probe)
    found["probe_f1"] = dict(zip(LETTERS, probe.f1, strict=True))
    found["config"] = saebench_config(words)
    return found


def saebench_config(words: int) -> dict[str, Any]:
    """SAEBench's `AbsorptionEvalConfig` fields this run stands for (`words` is ours)."""
    return {
        "random_seed": SEED, "f1_jump_threshold": F1_JUMP, "max_k_value": MAX_K,
        "prompt_template": "{word}" + TEMPLATE, "prompt_token_pos": -6,
        "k_sparse_probe_l1_decay": 0.01, "k_sparse_probe_batch_size": PROBE_BATCH,
        "k_sparse_probe_num_epochs": 50, "min_GT_probe_f1": MIN_PROBE_F1,
        "min_feats_for_eval": MIN_LETTERS, "eval_k_sparse_probe_batch_size": PROBE_BATCH,
        "precalc_k_sparse_probe_sae_acts": True, "words": words,
    }  # fmt: skip
