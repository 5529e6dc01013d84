"""A `gemmascope eval` run: which SAEs, on which model, the text they are scored on, and the file."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemmascope.common.config import flat, inherit, nested, option
from gemmascope.common.devices import check_device, resolve_device
from gemmascope.evaluate.config import EvalConfig
from gemmascope.evaluate.passes import evaluate
from gemmascope.evaluate.results import expand_sources, write_results


@dataclass
class EvalJob:
    """Score SAEs on held-out tokens: L0, FVU, MSE, cosine, delta LM loss, loss recovered, dead/dense."""

    sources: list[str] = option(positional=True)
    """params.npz files, SAE folders, folders of SAEs (a training run) or hub repos."""
    out: Path = option(Path("results.json"), required=True)
    """Results file (JSON), written atomically."""
    sae_id: list[str] = option(default_factory=list)
    """Which SAE of each source (repeat for several); default: all of a folder."""
    model: str = "gemma-3-270m"
    """`gemma-3-270m` (embedded), a hub name or a local folder."""
    device: str = "auto"
    """Torch device: cpu, cuda, cuda:N, mps, or auto (a GPU if there is one)."""
    eval: EvalConfig = nested(EvalConfig)
    """The text and the passes."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        check_device(self.device)
        if not self.sources:
            raise ValueError("no SAEs to evaluate: name at least one file, folder or repo")
        inherit(self, "eval")


def run_eval(job: EvalJob) -> list[dict[str, Any]]:
    """Load the SAEs and the model, evaluate, write `job.out`; the records, one per SAE."""
    from gemmascope import io
    from gemmascope.clt import CLT
    from gemmascope.models import load_model

    pairs = expand_sources(job.sources, job.sae_id)
    device = resolve_device(job.device)
    saes = [io.load(src, sid, device=device) for src, sid in pairs]
    lm, tokenizer = load_model(job.model, device=device)
    settings = {k: v for k, v in flat(job).items() if k not in ("sources", "out", "sae_id")}
    print(f"evaluating {len(saes)} SAE(s): {settings}", file=sys.stderr)
    records = evaluate(lm, tokenizer, saes, job.eval)
    per_layer = [pair for pair, sae in zip(pairs, saes, strict=True)
                 for _ in range(sae.n_layers if isinstance(sae, CLT) else 1)]  # fmt: skip
    for record, (src, sid) in zip(records, per_layer, strict=True):
        record.update(source=src, sae_id=sid)
    write_results(job.out, records, settings)
    return records
