"""Absorption's words: single-token words of letters in first-letter prompts, and the activation
at each word's token (SAEBench's `absorption_first_letter` data, built from token ids)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gemmascope.common.progress import progress_bar
from gemmascope.hooks import collect
from gemmascope.models import SiteKey

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = " has the first letter:"  # after each word, then ` {LETTER}` and a newline
WORDS_PER_PROMPT = 11
TRAIN_SHARE = 0.8
SEED = 42
TOKENS_PER_WORD = 83 / 11  # BOS, newline, 11 words, 10 templates and answers: for plans


def spelling_vocab(tokenizer: Any) -> list[tuple[str, int]]:
    """(word, token id) of every token that decodes to letters only, one leading space allowed."""
    out = []
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda t: t[1]):
        word = tokenizer.convert_tokens_to_string([token])
        if token.startswith("\u2581") and not word.startswith(" "):
            word = " " + word  # SentencePiece's word-start marker, as SAEBench restores it
        body = word[1:] if word.startswith(" ") else word
        if body and body.isascii() and body.isalpha():
            out.append((word, i))
    return out


def check_spelling(tokenizer: Any) -> list[tuple[str, int]]:
    """The spelling vocabulary, refused (before any forward) when it is too small to probe."""
    vocab = spelling_vocab(tokenizer)
    if len(vocab) < 10 * WORDS_PER_PROMPT:
        raise ValueError(
            f"the tokenizer has {len(vocab)} single-token words of letters only; absorption needs "
            f"at least {10 * WORDS_PER_PROMPT} (it probes which letter a word starts with); leave "
            "`absorption` out of --evals for this model"
        )
    return vocab


def first_letter(word: str) -> int:
    return LETTERS.index(word.strip()[0].lower())


@dataclass
class Spelling:
    """Words in first-letter prompts and the activation at each word's token."""

    words: list[str]  # [n]
    letters: Tensor  # [n] 0..25
    train: Tensor  # [n] bool
    acts: dict[SiteKey, Tensor]  # [n, d] float32


def spelling_prompts(
    tokenizer: Any, n_words: int, seed: int = SEED
) -> tuple[list[list[int]], list[list[int]], list[list[str]], list[bool]]:
    """Prompts of `WORDS_PER_PROMPT` words each as token ids, cut after their last word; the position
    of each word; the words; whether each prompt is a training one. The first `TRAIN_SHARE` of a
    random draw of `n_words` words trains, the rest tests, and a prompt holds words of one split."""
    vocab = check_spelling(tokenizer)
    rng = random.Random(seed)
    drawn = rng.sample(vocab, min(n_words, len(vocab)))
    cut = int(len(drawn) * TRAIN_SHARE)
    sep = tokenizer("\n", add_special_tokens=False)["input_ids"]
    tail = tokenizer(TEMPLATE, add_special_tokens=False)["input_ids"]
    answer = {c: tokenizer(" " + c.upper(), add_special_tokens=False)["input_ids"] for c in LETTERS}
    prompts, positions, words, train = [], [], [], []
    for split, pool in ((True, drawn[:cut]), (False, drawn[cut:])):
        for i in range(0, len(pool), WORDS_PER_PROMPT):
            group = pool[i : i + WORDS_PER_PROMPT]
            ids, at = [tokenizer.bos_token_id, *sep], []
            for j, (word, token) in enumerate(group):
                at.append(len(ids))
                ids.append(token)
                if j < len(group) - 1:
                    ids += tail + answer[LETTERS[first_letter(word)]] + sep
            prompts.append(ids)
            positions.append(at)
            words.append([w for w, _ in group])
            train.append(split)
    return prompts, positions, words, train


def spelling_activations(
    model: nn.Module, tokenizer: Any, keys: Sequence[SiteKey], *, n_words: int,
    batch_size: int = 32, progress: bool = True,
) -> Spelling:  # fmt: skip
    """One forward per batch of prompts reads every `(layer, site)` of `keys` at every word."""
    prompts, positions, words, train = spelling_prompts(tokenizer, n_words)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acts: dict[SiteKey, list[Tensor]] = {k: [] for k in keys}
    bar = progress_bar(len(prompts), unit="prompt", desc="absorption prompts", enabled=progress)
    with torch.no_grad(), bar:
        for b in range(0, len(prompts), batch_size):
            chunk = prompts[b : b + batch_size]
            ids, mask = padded(chunk, pad)
            at = positions[b : b + batch_size]
            rows = [r for r, word_at in enumerate(at) for _ in word_at]
            cols = [c for word_at in at for c in word_at]
            found = collect(model, ids.to(device), list(keys), attention_mask=mask.to(device))
            for k in keys:
                acts[k].append(found[k][rows, cols].float().cpu())  # (words, d)
            bar.update(len(chunk))
    flat_words = [w for ws in words for w in ws]
    split = [t for ws, t in zip(words, train, strict=True) for _ in ws]
    return Spelling(
        flat_words, torch.tensor([first_letter(w) for w in flat_words]), torch.tensor(split),
        {k: torch.cat(v) for k, v in acts.items()},
    )  # fmt: skip


def padded(prompts: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Prompts as one right-padded batch `[B, T]` of ids, and its attention mask."""
    ids = torch.full((len(prompts), max(map(len, prompts))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.tensor(p)
        mask[r, : len(p)] = 1
    return ids, mask
