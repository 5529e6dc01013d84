"""What a `gemmascope cache` run computes and where it keeps it; what identifies the result."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gemmascope.common.config import check, option
from gemmascope.common.devices import check_device
from gemmascope.common.units import Count
from gemmascope.corpus import EVAL_FRACTION, fingerprint
from gemmascope.models import Site


@dataclass
class CacheConfig:
    """A `gemmascope cache` run: which activations to compute and where to keep them."""

    out: Path = option(Path("cache"), required=True)
    """Cache folder; rerunning the same command resumes it."""
    model: str = "gemma-3-270m"
    """Model name or local path, as `models.load_model` takes it."""
    layers: str = "all"
    """Layer spec, e.g. `0-17`, `3,6,9` or `all`."""
    sites: list[Site] = option(default_factory=lambda: ["resid_post"])
    """Sites within each layer: resid_pre, attn_z, attn_out, mlp_in, mlp_out, resid_post."""
    tokens: Count = option(1_000_000, ge=1)
    """Activation vectors to cache per (layer, site): exactly this many collected positions."""
    corpus: str = "default"
    """`default`, a .txt/.jsonl/.parquet file, folder or glob, or a Hugging Face dataset name."""
    text_column: str = "text"
    """Text field of .jsonl/.parquet/Hugging Face rows."""
    split: Literal["train", "eval"] = "train"
    """`train` or the held-out `eval` documents (by hash, see `corpus.in_eval_split`)."""
    eval_fraction: float = option(EVAL_FRACTION, ge=0, lt=1)
    """Share of documents held out for evaluation."""
    context_size: int = option(1024, ge=2)
    """Tokens per sequence, BOS included (Gemma Scope: 1024)."""
    batch_size: int = option(8, ge=1)
    """Sequences per forward."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype: `float32`, `bfloat16` or `float16`."""
    keep_special: bool = False
    """Also collect BOS, EOS and padding positions (Gemma Scope did not)."""
    shard_tokens: int | None = option(None, ge=1)
    """Tokens per shard; None picks about 1 GiB per shard over all sites."""
    device: str = "auto"
    """Where the model runs: cpu, cuda, cuda:N, mps, or auto (this rank's GPU if there is one)."""
    verify: bool = False
    """On resume, check the sha256 of every existing shard, not only its size."""

    def __post_init__(self) -> None:
        check(self)
        self.out = Path(self.out)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"`dtype` {self.dtype!r}: choose float32, bfloat16 or float16")
        if self.split not in ("train", "eval"):
            raise ValueError(f"`split` {self.split!r}: choose train or eval")
        for name in ("tokens", "context_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.shard_tokens is not None and self.shard_tokens <= 0:
            raise ValueError(f"`shard_tokens` must be positive, got {self.shard_tokens}")
        if not self.sites:
            raise ValueError("`sites` is empty; name at least one, e.g. resid_post")

        check_device(self.device)


def model_identity(model: Any, info: Any, name: str) -> dict[str, Any]:
    """What a manifest records about the model, so a cache is never read as another model's.

    The folder it was loaded from is kept apart (`model_path`): moving the user cache must not
    make a resumed run look like another model's.
    """
    return {
        "name": name,
        "revision": getattr(getattr(model, "config", None), "_commit_hash", None),
        "family": info.family,
        "n_layers": info.n_layers,
        "d_model": info.d_model,
    }


def corpus_identity(cfg: CacheConfig) -> dict[str, Any]:
    """The corpus, split and packing that define the token stream of a cache."""
    return {
        **fingerprint(cfg.corpus, text_column=cfg.text_column),
        "split": cfg.split,
        "eval_fraction": cfg.eval_fraction,
    }
