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
from gemmascope.evaluate.saebench_files import saebench_paths, write_saebench


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
    saebench_out: Path | None = None
    """Also write SAEBench's result files here (`core/{release}_{sae_id}_eval_results.json`)."""
    index: Path | None = None
    """Feature index (`gemmascope index`) of the one SAE evaluated, to store auto-interpretation's
    explanations and scores in for the explorer."""
    eval: EvalConfig = nested(EvalConfig)
    """The text and the passes."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        check_device(self.device)
        if not self.sources:
            raise ValueError("no SAEs to evaluate: name at least one file, folder or repo")
        inherit(self, "eval")
        if self.index is not None and "autointerp" not in self.eval.evals:
            raise ValueError("--index stores auto-interpretation's explanations: add autointerp "
                             "to --evals, or leave --index out")  # fmt: skip


def run_eval(job: EvalJob) -> list[dict[str, Any]]:
    """Load the SAEs and the model, evaluate, write `job.out`; the records, one per SAE."""
    from gemmascope import io
    from gemmascope.clt import CLT
    from gemmascope.models import load_model

    pairs = expand_sources(job.sources, job.sae_id)
    device = resolve_device(job.device)
    saes = [io.load(src, sid, device=device) for src, sid in pairs]
    per_layer = [(pair, sae, i) for pair, sae in zip(pairs, saes, strict=True)
                 for i in range(sae.n_layers if isinstance(sae, CLT) else 1)]  # fmt: skip
    if job.saebench_out is not None:  # refuse a clash before any work
        saebench_paths(job.saebench_out, [
            {"source": src, "sae_id": sid, "layer": sae.cfg.layer + i, "cross_layer": isinstance(sae, CLT)}
            for (src, sid), sae, i in per_layer
        ], job.eval.evals)  # fmt: skip
    if job.index is not None:
        from gemmascope.evaluate.explanations import check_index

        if len(per_layer) != 1:
            raise ValueError(f"--index names one SAE's index; {len(per_layer)} SAEs (or CLT layers) "
                             "are evaluated here: evaluate that SAE alone")  # fmt: skip
        if isinstance(per_layer[0][1], CLT):
            raise ValueError("--index takes an SAE's or transcoder's index; a CLT layer's "
                             "explanations are not stored")  # fmt: skip
        check_index(job.index, per_layer[0][1])
    lm, tokenizer = load_model(job.model, device=device)
    skipped = ("sources", "out", "sae_id", "saebench_out", "index")
    settings = {k: v for k, v in flat(job).items() if k not in skipped}
    print(f"evaluating {len(saes)} SAE(s): {settings}", file=sys.stderr)
    details = job.saebench_out is not None
    records = evaluate(lm, tokenizer, saes, job.eval, details=details)
    for record, ((src, sid), _, _) in zip(records, per_layer, strict=True):
        record.update(source=src, sae_id=sid)
    if details:
        cfgs = [sae.cfg.to_dict() for _, sae, _ in per_layer]
        write_saebench(job.saebench_out, records, settings, cfgs)
        for record in records:
            del record["saebench_details"]
    write_results(job.out, records, settings)
    if job.index is not None:
        from gemmascope.evaluate.explanations import store_explanations

        found = records[0]["saebench"]["autointerp"]
        n = store_explanations(job.index, found["details"], found["explainer"])
        print(f"{n} explanations stored in {job.index}", file=sys.stderr)
    return records
