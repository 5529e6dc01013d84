"""What an evaluation reads: which text, how much of it, and which forwards to run."""

from __future__ import annotations

from dataclasses import dataclass

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
    eval_fraction: float = EVAL_FRACTION
    """Share of documents held out."""
    tokens: Count = 100_000
    """Tokens to forward, e.g. 100k, BOS included; rounded up to whole sequences."""
    context_size: int = 1024
    """Tokens per sequence, BOS included (Gemma Scope: 1024)."""
    batch_size: int = 8
    """Sequences per forward."""
    ablations: bool = True
    """Also run zero- and mean-ablation (for the fraction of loss recovered)."""
    ce_chunk: int = 512
    """Positions per cross-entropy chunk (memory ~ 2 x chunk x vocab x 4 B)."""

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval", "all"):
            raise ValueError(f"`split` {self.split!r}: choose eval, train or all")
        for name in ("tokens", "context_size", "batch_size", "ce_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}")
