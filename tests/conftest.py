"""Shared fixtures: tiny random models of every supported family, built from configs (no download)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 64
# Shared by the Llama-layout families; Gemma and GPT-2 name some of these differently.
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)


def _gemma2() -> Gemma2Config:
    # head_dim * heads = 64 != hidden 32, so attn_z's width is its own; window 4 < test length.
    return Gemma2Config(**_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=4)


def _gemma3() -> Gemma3TextConfig:
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    return Gemma3TextConfig(
        **_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=4, layer_types=layer_types
    )


def _llama() -> LlamaConfig:
    return LlamaConfig(**_COMMON)


def _qwen2() -> Qwen2Config:
    return Qwen2Config(**_COMMON)


def _gpt2() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, initializer_range=0.1,
        bos_token_id=2, eos_token_id=1,
    )  # fmt: skip


BUILDERS: dict[str, Callable[[], Any]] = {
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "llama": _llama,
    "qwen2": _qwen2,
    "gpt2": _gpt2,
}


def build_tiny(family: str) -> Any:
    """A seeded, frozen, eval-mode tiny causal LM of `family` with eager attention."""
    config = BUILDERS[family]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def make_tiny() -> Callable[[str], Any]:
    """`build_tiny` for tests that need a fresh model of one family."""
    return build_tiny


@pytest.fixture(scope="session", params=sorted(BUILDERS))
def tiny(request: pytest.FixtureRequest) -> Any:
    """Each supported family in turn; tests must leave the model as they found it."""
    return build_tiny(request.param)


@pytest.fixture(scope="session")
def tiny_gemma3() -> Any:
    return build_tiny("gemma3")


@pytest.fixture
def tokens() -> torch.Tensor:
    """Two sequences of 12 ids, longer than the Gemma sliding window of 4."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 12), generator=g)


def tiny_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` from id 3 (0-2: pad, eos, bos); by default the made-up
    words `w3`.. of the `VOCAB` ids of the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = words or [f"w{i}" for i in range(3, VOCAB)]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{w: i for i, w in enumerate(words, start=3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and tokenizer written with `save_pretrained`, as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gemma_layer6_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100k tokens of the real Gemma 3 270M's layer 6 `resid_post` on the default corpus's train
    split, cached once for the slow tests that train on real activations."""
    from gemmascope.activations import CacheConfig, build_cache

    out = tmp_path_factory.mktemp("gemma-layer6") / "cache"
    return build_cache(CacheConfig(out=out, layers="6", sites=["resid_post"], tokens=100_000),
                       progress=False)  # fmt: skip


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 documents of made-up words w3..w63 (about 13k tokens), as the tiny tokenizer knows them."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for _ in range(400):
            words = " ".join(f"w{rng.randrange(3, 64)}" for _ in range(rng.randrange(5, 60)))
            f.write(json.dumps({"text": words}) + "\n")
    return path


UNPICKLED: list[str] = []
"""Tags recorded by `Exploit` when something unpickles it: must stay empty."""


def _record(tag: str) -> None:
    UNPICKLED.append(tag)


class Exploit:
    """Unpickling this runs `_record`: a stand-in for arbitrary code in a hostile file."""

    def __reduce__(self):
        return (_record, ("unpickled",))


@pytest.fixture
def no_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluate` fails if it reaches its forwards: for checks that must refuse before any work."""
    import gemmascope.evaluate.passes as passes

    def forward(*_: object, **__: object) -> None:
        raise AssertionError("a forward ran before the settings were checked")

    monkeypatch.setattr(passes, "evaluate_sequences", forward)
