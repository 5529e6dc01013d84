"""What an evaluation reads: which text, how much of it, and which forwards to run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gemmascope.common.config import check, nested, option
from gemmascope.common.units import Count
from gemmascope.corpus import EVAL_FRACTION, CorpusSplit
from gemmascope.evaluate.explainer import ExplainerConfig


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
    """Positions per cross-entropy and KL chunk (memory ~ 3 x chunk x vocab x 4 B)."""
    evals: list[Literal["core", "absorption", "sparse_probing", "autointerp"]] = option(
        default_factory=lambda: ["core"]
    )
    """Which evaluations: `core` (always: L0, FVU, delta LM loss and SAEBench's core metrics),
    `absorption` (SAEBench's first-letter feature absorption), `sparse_probing` (SAEBench's
    k-sparse probes on labelled text) and `autointerp` (an LLM explains latents and is scored on
    predicting them from its explanation)."""
    absorption_words: Count = option(20_000, ge=100)
    """Single-token words drawn from the vocabulary for absorption (80% train its probes)."""
    probe_tasks: list[str] = option(default_factory=lambda: ["brown_genre", "source"])
    """Sparse probing tasks: `brown_genre`, `source`, or .jsonl/.parquet files or Hugging Face
    datasets with a text and a `label` column."""
    probe_train: Count = option(1000, ge=4)
    """Training windows per probing task (spread over its classes)."""
    probe_test: Count = option(250, ge=4)
    """Test windows per probing task, from held-out documents."""
    probe_context: int = option(128, ge=2)
    """Tokens per probing window, BOS included (SAEBench: 128)."""
    probe_k: list[int] = option(default_factory=lambda: [1, 2, 5], ge=1)
    """Latents (dimensions) kept by the k-sparse probes (SAEBench: 1, 2, 5)."""
    autointerp_latents: int = option(50, ge=1)
    """Latents explained and scored per SAE, drawn among the live ones (SAEBench: 1,000)."""
    explainer: ExplainerConfig = nested(ExplainerConfig, prefix="explainer")
    """The LLM behind auto-interpretation."""

    def __post_init__(self) -> None:
        check(self)
        if self.split not in ("train", "eval", "all"):
            raise ValueError(f"`split` {self.split!r}: choose eval, train or all")
        if "core" not in self.evals:
            raise ValueError(
                f"`evals` {self.evals}: `core` builds every record; keep it, e.g. core,sparse_probing"
            )
        for name in ("tokens", "context_size", "batch_size", "ce_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}")
