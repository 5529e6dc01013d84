"""What a `gemmascope suite` run builds: the grid of SAEs, and the cache, training and evaluation
configs every (layer, site) of it uses (each declared once, in its own step's module)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmascope.activations.config import CacheConfig
from gemmascope.common.config import check, flat, inherit, leaves, nested, option
from gemmascope.common.devices import check_device
from gemmascope.common.units import Bytes, Count, Width
from gemmascope.corpus import EVAL_FRACTION
from gemmascope.evaluate.config import EvalConfig
from gemmascope.explore.index import IndexConfig
from gemmascope.train.config import RECIPES, TrainConfig, TrainFlags

RUNTIME = (
    "out", "device", "keep_cache", "disk_budget", "cache_verify", "log_every", "parallel",
    "checkpoint_every", "recipe",
)  # fmt: skip
"""Flags that may change between a run and its resume: they do not change the result (`recipe`
only fills in options, which are compared themselves)."""


@dataclass
class SuiteConfig:
    """A `gemmascope suite` run: the grid of SAEs, how long to train them, and where the suite goes.

    `model`, `corpus`, `text_column`, `eval_fraction`, `context_size`, `device` and `seed` are the
    suite's own: they replace those of the `cache`, `train` and `eval` configs it holds, as
    `model_batch_size` replaces their batch sizes of sequences (the command line has one flag each).
    """

    out: Path
    """Suite folder; rerunning the same command resumes it."""
    model: str = "gemma-3-270m"
    """`gemma-3-270m` (embedded), a hub name or a local folder."""
    sites: list[str] = field(default_factory=lambda: ["resid_post"])
    """Sites within each layer: resid_post, mlp_out, attn_z, attn_out, resid_pre."""
    layers: str = "all"
    """Layers: `all`, `0-17`, `3,6,9`."""
    widths: list[Width] = option(default_factory=lambda: [16384], ge=1)
    """SAE widths (latents), e.g. `4k,16k`."""
    target_l0s: list[float] = option(default_factory=lambda: [50.0], flags=("--l0",), gt=0)
    """Target L0s: one JumpReLU SAE per width and target, trained in target-L0 mode."""
    train_tokens: Count | None = option(None, ge=1)
    """Tokens each SAE trains on (default: `--tokens`, one epoch); more loop over the cache."""
    corpus: str = "default"
    """`default`, a .txt/.jsonl/.parquet file, folder or glob, or a Hugging Face dataset name."""
    text_column: str = "text"
    """Text field of .jsonl/.parquet/Hugging Face rows."""
    eval_fraction: float = option(EVAL_FRACTION, ge=0, lt=1)
    """Share of documents held out for evaluation."""
    context_size: int = option(1024, ge=2)
    """Tokens per sequence, BOS included."""
    model_batch_size: int = option(8, ge=1)
    """Sequences per model forward (caching and evaluation)."""
    buffer_size: int = option(1 << 19, ge=1)
    """Activation vectors shuffled together when training."""
    seed: int = option(0, ge=0)
    """Seed of SAE init and data order."""
    saelens: bool = False
    """Also publish a SAELens-format copy."""
    base_model: str | None = None
    """Hub id for the model card (default: from the model name, e.g. google/gemma-3-270m)."""
    disk_budget: Bytes | None = option(None, ge=1)
    """Disk the suite may use, e.g. 50G (default: the free space at `out`); caches go in groups of
    layers that fit it."""
    keep_cache: bool = False
    """Keep each group's activation cache instead of dropping it once its SAEs are trained."""
    device: str = "auto"
    """Where the model and the SAEs run: cpu, cuda, cuda:N, mps, or auto (the GPU if there is one)."""
    cache: CacheConfig = nested(
        CacheConfig, prefix="cache", rename={"tokens": "tokens"},
        hide=("out", "layers", "sites", "split", "batch_size"), defaults={"tokens": 2_000_000},
    )  # fmt: skip
    """How each group of layers is cached (`--tokens` per (layer, site), `--cache-dtype`, ...)."""
    train: TrainConfig = nested(TrainFlags, hide=("tokens",), aliases=False)
    """How every SAE trains (`--lr`, `--batch-size`, `--center`, ...)."""
    eval: EvalConfig = nested(
        EvalConfig, prefix="eval", rename={"ablations": "ablations"}, hide=("split", "batch_size"),
        defaults={"tokens": 20_000},
    )  # fmt: skip
    """How every SAE is evaluated on held-out text (`--eval-tokens`, `--ablations`, ...)."""
    index: IndexConfig = nested(
        IndexConfig, prefix="index",
        hide=("sae_source", "out", "sae_id", "clt_layer", "layer", "site", "split", "batch_size",
              "checkpoint_seconds", "overwrite"),
        defaults={"tokens": 1_000_000},
    )  # fmt: skip
    """How every SAE's feature index is built for `gemmascope explore` (`--index-tokens`, ...)."""

    def __post_init__(self) -> None:
        check(self)
        self.out = Path(self.out)
        check_device(self.device)
        if not self.sites or not self.widths or not self.target_l0s:
            raise ValueError("`sites`, `widths` and `target_l0s` each need at least one value")
        if len(set(self.sites)) != len(self.sites) or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"`sites` {self.sites} or `widths` {self.widths} repeat a value")
        for name in ("model_batch_size", "context_size", "buffer_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        inherit(self, "cache", "train", "eval", "index")
        self.cache = dataclasses.replace(self.cache, batch_size=self.model_batch_size)
        self.eval = dataclasses.replace(self.eval, batch_size=self.model_batch_size, split="eval")
        self.index = dataclasses.replace(self.index, batch_size=self.model_batch_size)
        if self.train_tokens is None:
            self.train_tokens = self.cache.tokens
        tokens, batch = min(self.cache.tokens, self.train_tokens), self.train.batch_size
        if tokens < batch:
            raise ValueError(
                f"`tokens`={self.cache.tokens:,} or `train_tokens`={self.train_tokens:,} is less "
                f"than one training batch (`batch_size`={batch:,}); ask for more tokens or a "
                "smaller batch"
            )
        given = {f.name: getattr(self.train, f.name) for f in dataclasses.fields(TrainConfig)}
        self.train = TrainConfig(**{**given, "tokens": self.train_tokens, "dataset": self.corpus})

    def train_config(self) -> TrainConfig:
        """The `TrainConfig` every (layer, site) of the suite trains with."""
        return self.train

    def identity(self) -> dict[str, Any]:
        """Every flag that defines the suite's result, by flag name (a resume must match them)."""
        return {k: v for k, v in flat(self).items() if k not in RUNTIME}


def identity_defaults() -> dict[str, Any]:
    """What each identity field is when not given: a suite made before a field existed had it so
    (the options a recipe sets had the paper's values before there were recipes)."""
    return {
        leaf.name: RECIPES["paper"].get(leaf.name, leaf.default)
        for leaf in leaves(SuiteConfig)
        if leaf.name not in RUNTIME
    }
