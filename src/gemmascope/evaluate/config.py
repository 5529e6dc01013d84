"""What an evaluation reads: which text, how much of it, and which forwards to run."""

from __future__ import annotations

from dataclasses import dataclass

from gemmascope.common.config import check, option
from gemmascope.common.units import Count
from gemmascope.corpus import EVAL_FRACTION, CorpusSplit


@dataclass
class EvalConfig:
    """The held-out text every SAE of an evaluation is scored on, and the passes run over it."""

    model: str | None = None
    """Model name recorded in each result (default: the SAE config's `model`)."""
    corpus: str = "default"
    """`default`, a .txt/.jsonl/.parquet file, folder or glob, or a Hugging Face dataset name."""
    text_column: str = "text"
    """Text field of .jsonl/.parquet/Hugging Face rows."""
    split: CorpusSplit = "eval"
    """`eval` (held-out documents), `train` or `all`."""
    eval_fraction: float = option(EVAL_FRACTION, ge=0, lt=1)
    """Share of documents held out."""
    tokens: Count = option(100_000, ge=1)
    """Tokens to forward, e.g. 100k, BOS included; rounded up to whole sequences."""
    context_size: int = option(1024, ge=2)
    """Tokens per sequence, BOS included (Gemma Scope: 1024)."""
    batch_size: int = option(8, ge=1)
    """Sequences per forward."""
    ablations: bool = True
    """Also run zero- and mean-ablation (for the fraction of loss recovered)."""
    ce_chunk: int = option(512, ge=1)
    """Positions per cross-entropy chunk (memory ~ 2 x chunk x vocab x 4 B)."""

    def __post_init__(self) -> None:
        check(self)
        if self.split not in ("train", "eval", "all"):
            raise ValueError(f"`split` {self.split!r}: choose eval, train or all")
        for name in ("tokens", "context_size", "batch_size", "ce_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}")
