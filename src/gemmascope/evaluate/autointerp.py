"""Auto-interpretation: an LLM explains each latent from its contexts, then predicts from the
explanation where the latent fires; the better it predicts, the better the explanation.

As SAEBench's `autointerp` (after EleutherAI's "Open Source Automated Interpretability for Sparse
Autoencoder Features"), on the evaluation's held-out sequences:

1. One forward per batch reads every SAE's site; each SAE's latents go into a `FeatureStats` (top
   contexts and a sample from each octave band below the top, windows of `WINDOW` tokens each side)
   and into a pool of random windows, whose latents are kept sparse.
2. `autointerp_latents` latents are drawn among those active on more than `ALIVE_ABOVE` tokens.
3. Explanation: the 10 strongest non-overlapping contexts and one sampled context per band, the
   tokens where the latent exceeds 1% of its maximum marked `<<so>>`.
4. Detection: 2 more top contexts, one more sample per band and 10 random windows, unmarked and
   shuffled; the LLM names those the latent is active on. `autointerp_score` is SAEBench's (the
   fraction of windows classified right); `detection` is delphi's balanced accuracy.
5. Fuzzing (delphi): the activating scoring windows again, half marked where the latent is active
   and half at as many random inactive tokens; the LLM names the correctly marked ones (balanced
   accuracy).

An answer that names no number and no "None" is unparsed: that latent gets no score, and `scored`
counts those that did.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gemmascope.common.progress import progress_bar
from gemmascope.corpus import special_ids
from gemmascope.corpus.tokens import stitch
from gemmascope.evaluate.explainer import Explainer, Messages
from gemmascope.evaluate.feature_stats import FeatureStats, token_decoder
from gemmascope.hooks import collect

WINDOW = 10
"""Tokens kept on each side of an activation (SAEBench's `buffer`)."""
TOP_EXPLAIN, TOP_SCORE, RANDOM_SCORE = 10, 2, 10
BANDS = 4
"""Octave bands sampled below the top: one context of each explains, one more is scored."""
ALIVE_ABOVE = 15
"""Latents active on at most this many tokens are not explained (SAEBench's threshold)."""
THRESHOLD_FRAC = 0.01
"""A token counts as active above this fraction of the latent's maximum (SAEBench's)."""
RANDOM_POOL = 1000
"""Random windows drawn from the sequences (at least one from each), shared by all latents."""
WINDOWS_PER_GATHER = 48
"""Random windows whose latents are gathered at once (`[48 * 21, d_sae]` floats)."""
EXPLANATION_TOKENS, ANSWER_TOKENS = 40, 40
SEED = 42
ASK_SECONDS = 3.3
"""Seconds per request to the local explainer on a 2-core CPU (measured: docs/evaluation.md); what
suite plans assume."""

EXPLAIN = (
    "You are helping to interpret a feature of a language model. The feature is active on some "
    "tokens of the short texts below, marked <<like this>>; the texts come in order from the "
    "strongest activation down. In one short phrase of at most 15 words, say what the feature "
    "responds to: a word, part of a word, a kind of token or a topic. Answer with the phrase only."
)
DETECT = (
    "A feature of a language model is described by an explanation. Reply with the numbers of the "
    "texts below that contain a token the feature is active on, separated by commas (e.g. 2, 5), "
    "or None if no text does. Reply with nothing else."
)
FUZZ = (
    "A feature of a language model is described by an explanation. In each text below some tokens "
    "are marked <<like this>>: in some texts they are where the feature is active, in others they "
    "were picked at random. Reply with the numbers of the texts whose marked tokens fit the "
    "explanation, separated by commas, or None. Reply with nothing else."
)


@dataclass
class Example:
    """A window of text with one latent's activations on it."""

    tokens: list[str]
    acts: list[float]
    threshold: float

    @property
    def active(self) -> list[bool]:
        return [a > self.threshold for a in self.acts]

    def text(self, marks: Sequence[bool] | None = None) -> str:
        """The window as one line, `marks` tokens wrapped in << >> (SAEBench's rendering). A token
        that only starts a character (text '', see `corpus.tokens.stitch`) hands its mark on to
        the token that completes it, so the explainer never sees an empty `<<>>`."""
        marks = marks or [False] * len(self.tokens)
        out, marked = [], False
        for t, m in zip(self.tokens, marks, strict=True):
            marked = marked or m
            if t:
                out.append(f"<<{t}>>" if marked else t)
                marked = False
        return "".join(out).replace("\ufffd", "").replace("\n", "↵")


def autointerp(
    model: Any, tokenizer: Any, items: Sequence[Any], sequences: Sequence[np.ndarray], cfg: Any,
    explainer: Explainer, *, progress: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """Explain and score `cfg.autointerp_latents` latents of each item (an SAE, or a layer of a CLT
    as `passes.per_layer` gives them) on `sequences`, with `cfg` an `EvalConfig`.

    Returns per item `autointerp_score` and `autointerp_std_dev` (SAEBench's), `detection` and
    `fuzzing` (balanced accuracies), counts, and `details`: per latent its explanation and scores."""
    stats, pool = collect_contexts(model, tokenizer, items, sequences, cfg.batch_size, progress)
    decode = token_decoder(tokenizer)
    out = []
    for j, st in enumerate(stats):
        alive = (st.fired > ALIVE_ABOVE).nonzero().squeeze(1).tolist()
        rng = random.Random(SEED + j)
        latents = sorted(rng.sample(alive, min(cfg.autointerp_latents, len(alive))))
        sets = [_examples(st, pool, j, lat, decode, rng) for lat in latents]
        out.append(_score_item(explainer, latents, sets, rng, progress))
    return out


def collect_contexts(
    model: Any, tokenizer: Any, items: Sequence[Any], sequences: Sequence[np.ndarray],
    batch_size: int, progress: bool,
) -> tuple[list[FeatureStats], dict[str, Any]]:  # fmt: skip
    """One forward per batch: each item's `FeatureStats` and its latents on the random windows."""
    ids = torch.as_tensor(np.stack(sequences)).long()  # (S, T)
    S, T = ids.shape
    gen = torch.Generator().manual_seed(SEED)
    per_seq = max(1, -(-RANDOM_POOL // S))
    centers = torch.randint(1, T, (S, per_seq), generator=gen)  # (S, r) never the BOS
    offsets = torch.arange(-WINDOW, WINDOW + 1)  # (w,)
    w = len(offsets)
    pos = centers[..., None] + offsets  # (S, r, w)
    pool_tok = torch.where((pos >= 0) & (pos < T), ids.gather(1, pos.clamp(0, T - 1).flatten(1))
                           .view_as(pos), torch.tensor(-1))  # fmt: skip
    device = next(model.parameters()).device
    stats = [FeatureStats(s.cfg.d_sae, top_k=2 * (TOP_EXPLAIN + TOP_SCORE), window=WINDOW,
                          bands=BANDS, samples=2, seed=SEED, device=device) for s in items]  # fmt: skip
    found: list[list[Tensor]] = [[] for _ in items]  # (window, offset, latent, value) rows
    keys = sorted({(s.cfg.layer, s.cfg.site) for s in items})
    skip = torch.tensor(special_ids(tokenizer), device=device)
    pad = tokenizer.pad_token_id
    bar = progress_bar(S, unit="seq", desc="autointerp contexts", enabled=progress)
    with torch.no_grad(), bar:
        for chunk, start in enumerate(range(0, S, batch_size)):
            batch = ids[start : start + batch_size].to(device)  # (B, T)
            acts = collect(model, batch, keys,
                           attention_mask=(batch != pad).long() if pad is not None else None)  # fmt: skip
            counted = ~torch.isin(batch, skip)  # (B, T)
            for j, sae in enumerate(items):
                z = sae.encode(acts[sae.cfg.layer, sae.cfg.site]).float()  # (B, T, F)
                stats[j].update(z, batch, counted, start, chunk)  # zeroes the special positions
                for b in range(len(batch)):  # a few windows at a time: [n*w, F] stays small
                    seq = start + b
                    for r0 in range(0, per_seq, WINDOWS_PER_GATHER):
                        p = pos[seq, r0 : r0 + WINDOWS_PER_GATHER]  # (n, w)
                        inside = ((p >= 0) & (p < T)).flatten().to(device)  # (n*w,)
                        win = z[b, p.clamp(0, T - 1).flatten().to(device)] * inside[:, None]
                        q, lat = win.nonzero(as_tuple=True)  # q: window-major, then offset
                        rows = torch.stack([seq * per_seq + r0 + q // w, q % w, lat]).cpu()
                        found[j].append(
                            torch.cat([rows.double(), win[q, lat].double().cpu()[None]])
                        )
            bar.update(len(batch))
    pool = {
        "tokens": pool_tok.view(S * per_seq, -1),  # (P, w) -1 off the sequence
        "positions": pos.view(S * per_seq, -1),  # (P, w) where each window's tokens sit
        "hits": [_sparse(f) for f in found],  # per item: its latents on the windows
    }
    return stats, pool


def _sparse(parts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(index rows `[3, n]`: window, offset, latent, sorted by latent; values `[n]`) of a pool."""
    rows = torch.cat(parts, 1) if parts else torch.zeros(4, 0, dtype=torch.float64)  # (4, n)
    rows = rows[:, torch.argsort(rows[2], stable=True)]
    return rows[:3].long(), rows[3].float()


def _examples(
    st: FeatureStats, pool: dict[str, Any], j: int, lat: int, decode: Any, rng: random.Random
) -> dict[str, list[Example]]:
    """The windows that explain latent `lat` and those that score it (positives, then randoms)."""
    k, s = st.top_k, st.samples
    threshold = THRESHOLD_FRAC * float(st.top_val[lat * k])
    top = [(float(st.top_val[i]), int(st.top_loc[i]), st.top_tok[i], st.top_act[i])
           for i in range(lat * k, lat * k + k) if st.top_val[i] > 0]  # fmt: skip
    top = _apart(top)
    bands = [[(float(st.band_val[i]), int(st.band_loc[i]), st.band_tok[i], st.band_act[i])
              for i in range((lat * BANDS + b) * s, (lat * BANDS + b + 1) * s)
              if torch.isfinite(st.band_key[i])] for b in range(BANDS)]  # fmt: skip
    explain = _apart(top[:TOP_EXPLAIN] + [band[0] for band in bands if band])
    score = _apart(explain + top[TOP_EXPLAIN : TOP_EXPLAIN + TOP_SCORE]
                   + [band[1] for band in bands if len(band) > 1])[len(explain) :]  # fmt: skip
    idx, val = pool["hits"][j]
    lo, hi = torch.searchsorted(idx[2], torch.tensor([lat, lat + 1])).tolist()
    n_windows = len(pool["tokens"])
    randoms = rng.sample(range(n_windows), min(RANDOM_SCORE, n_windows))
    acts = torch.zeros(n_windows, 2 * WINDOW + 1)
    acts[idx[0, lo:hi], idx[1, lo:hi]] = val[lo:hi]

    def example(toks: Tensor, act: Tensor) -> Example:
        keep = toks >= 0
        return Example(stitch(decode(toks[keep].tolist())), act[keep].tolist(), threshold)

    return {
        "explain": [example(t, a) for _, _, t, a in explain],
        "score": [example(t, a) for _, _, t, a in score],
        "random": [example(pool["tokens"][w], acts[w]) for w in randoms],
    }


def _apart(top: list[tuple]) -> list[tuple]:
    """The entries, in order, whose window overlaps none kept before it (SAEBench's `no_overlap`)."""
    kept: list[tuple] = []
    for entry in top:
        if all(abs(entry[1] - other[1]) > 2 * WINDOW for other in kept):
            kept.append(entry)
    return kept


def _score_item(
    explainer: Explainer, latents: list[int], sets: list[dict[str, list[Example]]],
    rng: random.Random, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    bar = progress_bar(3 * len(latents), unit="ask", desc="autointerp", enabled=progress)
    with bar:
        explanations = [_explanation(a) for a in explainer.ask_all([
            (explain_prompt(s["explain"]), EXPLANATION_TOKENS) for s in sets])]  # fmt: skip
        bar.update(len(latents))
        detect = [detection_set(s["score"] + s["random"], rng) for s in sets]
        fuzz = [fuzzing_set([e for e in s["score"] if any(e.active)], rng) for s in sets]
        asks: list[tuple[str, int, Messages]] = []  # (kind, latent's place, request)
        for i, e in enumerate(explanations):
            if e:  # an empty explanation is not scored
                asks.append(("detection", i, _ask(DETECT, e, [x.text() for x, _ in detect[i]])))
                if fuzz[i]:  # no activating window left to fuzz: no fuzzing score
                    asks.append(("fuzzing", i, _ask(FUZZ, e, [text for text, _ in fuzz[i]])))
        answers = explainer.ask_all([(m, ANSWER_TOKENS) for _, _, m in asks])
        bar.update(2 * len(latents))
    picked: dict[tuple[str, int], set[int] | None] = {}
    for (kind, i, _), answer in zip(asks, answers, strict=True):
        picked[kind, i] = parse_numbers(answer, len(detect[i] if kind == "detection" else fuzz[i]))
    details = []
    for i, lat in enumerate(latents):
        labels_d = [label for _, label in detect[i]]
        labels_f = [label for _, label in fuzz[i]]
        details.append({
            "latent": lat, "explanation": explanations[i],
            "detection": balanced_accuracy(picked.get(("detection", i)), labels_d),
            "detection_accuracy": accuracy(picked.get(("detection", i)), labels_d),
            "fuzzing": balanced_accuracy(picked.get(("fuzzing", i)), labels_f),
        })  # fmt: skip
    scored = [d for d in details if d["detection"] is not None]
    acc = [d["detection_accuracy"] for d in scored]
    fuzzing = [d["fuzzing"] for d in scored if d["fuzzing"] is not None]
    return {
        "autointerp_score": float(np.mean(acc)) if acc else None,
        "autointerp_std_dev": float(np.std(acc)) if acc else None,
        "detection": float(np.mean([d["detection"] for d in scored])) if scored else None,
        "fuzzing": float(np.mean(fuzzing)) if fuzzing else None,
        "latents": len(latents), "scored": len(scored), "explainer": explainer.name, "details": details,
    }  # fmt: skip


def explain_prompt(examples: list[Example]) -> Messages:
    """The explanation request: the examples in order of activation, active tokens marked."""
    texts = "\n".join(f"{i}. {e.text(e.active)}" for i, e in enumerate(examples, 1))
    return [
        {"role": "system", "content": EXPLAIN},
        {"role": "user", "content": f"Texts:\n\n{texts}"},
    ]


def _ask(system: str, explanation: str, texts: list[str]) -> Messages:
    numbered = "\n".join(f"{i}. {t}" for i, t in enumerate(texts, 1))
    user = f"Explanation: {explanation}\n\nTexts:\n\n{numbered}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def detection_set(examples: list[Example], rng: random.Random) -> list[tuple[Example, bool]]:
    """The scoring windows shuffled, each with whether the latent is active in it."""
    pairs = [(e, any(e.active)) for e in examples]
    rng.shuffle(pairs)
    return pairs


def fuzzing_set(examples: list[Example], rng: random.Random) -> list[tuple[str, bool]]:
    """Activating windows shuffled, every other one marked at as many random inactive tokens as it
    has active ones (False) instead of where it is active (True); one with no inactive token to
    mark is left out."""
    out = []
    for i, e in enumerate(rng.sample(examples, len(examples))):
        active = e.active
        if i % 2 == 0:
            out.append((e.text(active), True))
            continue
        idle = [t for t, a in enumerate(active) if not a]
        if not idle:
            continue
        wrong = set(rng.sample(idle, min(sum(active), len(idle))))
        out.append((e.text([t in wrong for t in range(len(active))]), False))
    return out


def parse_numbers(answer: str, n: int) -> set[int] | None:
    """The 0-based indices an answer names (numbers 1..n), the empty set for None, or None when the
    answer names neither."""
    numbers = {int(x) - 1 for x in re.findall(r"\d+", answer) if 1 <= int(x) <= n}
    if numbers or re.search(r"\d", answer):
        return numbers
    return set() if re.search(r"\bnone\b", answer, re.IGNORECASE) else None


def accuracy(picked: set[int] | None, labels: list[bool]) -> float | None:
    """Fraction of windows classified right (SAEBench's score)."""
    if picked is None or not labels:
        return None
    return sum((i in picked) == y for i, y in enumerate(labels)) / len(labels)


def balanced_accuracy(picked: set[int] | None, labels: list[bool]) -> float | None:
    """Mean of the recall on windows that are and that are not active; plain accuracy when only one
    kind is present."""
    if picked is None or not labels:
        return None
    recalls = [np.mean([(i in picked) == y for i, y in enumerate(labels) if y == kind])
               for kind in (True, False) if kind in labels]  # fmt: skip
    return float(np.mean(recalls))


def _explanation(answer: str) -> str:
    """The first line of an answer, without a "This feature activates on" lead-in or final stop."""
    line = next((ln.strip() for ln in answer.splitlines() if ln.strip()), "")
    line = re.sub(r"^(the|this)\s+(feature|neuron|latent)\s+(\w+\s+){0,2}(on|to|for)\s+", "", line,
                  flags=re.IGNORECASE)  # fmt: skip
    line = line.strip().rstrip(".").strip()
    if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'":  # quoted whole
        line = line[1:-1].strip()
    return line[:300]
