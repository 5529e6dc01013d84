"""A `gemmascope graph` run: a prompt, the transcoders, the graph folder, and interventions."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmascope.common.config import check, option
from gemmascope.common.devices import check_device


@dataclass
class GraphJob:
    """Trace the attribution graph of a prompt through MLP transcoders, as circuit-tracer does."""

    prompt: str = option(required=True)
    """The text whose next token is explained (the tokenizer's BOS is put in front)."""
    transcoders: Path = option(required=True)
    """MLP transcoders: a circuit-tracer transcoder set or CLT, a Gemma Scope 2 CLT folder, or a
    folder of transcoders (a training run: one per layer, or its cross-layer transcoder)."""
    out: Path = option(required=True)
    """Graph folder: graph.safetensors + graph.json (all edges), {slug}.json + graph-metadata.json
    (circuit-tracer's frontend and Neuronpedia's viewer read them)."""
    model: str = "gemma-3-270m"
    """`gemma-3-270m` (embedded), a hub name or a local folder."""
    pick: str | None = None
    """Text the transcoders' ids contain, when the folder holds several per layer (`clt_` picks a
    run's cross-layer transcoder)."""
    max_logits: int = option(10, ge=1)
    """Most logit targets: the likeliest next tokens ..."""
    logit_prob: float = option(0.95, gt=0, le=1)
    """... as few as hold this share of the probability."""
    batch_size: int = option(64, ge=1)
    """Targets per backward pass."""
    max_feature_nodes: int | None = option(None, ge=1)
    """Compute incoming edges for at most this many latents, the most influential first (as
    circuit-tracer's option of that name); memory then grows linearly with the prompt. Default all."""
    node_threshold: float = option(0.8, ge=0, le=1)
    """Pruning: keep the nodes holding this share of the influence on the logits."""
    edge_threshold: float = option(0.98, ge=0, le=1)
    """Pruning: keep the edges holding this share of the influence through edges."""
    slug: str | None = None
    """Name of the graph in the frontend (default: from the prompt)."""
    ablate: list[str] = field(default_factory=list)
    """Rerun with latents set to zero: `LAYER:LATENT` (every position) or `LAYER:LATENT@POS`."""
    steer: list[str] = field(default_factory=list)
    """Rerun with latents set to a value: `LAYER:LATENT=VALUE[@POS]`."""
    device: str = "auto"
    """Torch device: cpu, cuda, cuda:N, mps, or auto (a GPU if there is one)."""

    def __post_init__(self) -> None:
        check(self)
        check_device(self.device)
        self.out, self.transcoders = Path(self.out), Path(self.transcoders)
        self.changes  # noqa: B018 - a bad --ablate or --steer fails here, before any work
        if not self.transcoders.is_dir():
            raise ValueError(f"--transcoders {self.transcoders}: no such folder")
        out = self.out
        if out.exists() and not (out / "graph.safetensors").is_file() and any(out.iterdir()):
            raise ValueError(f"--out {out}: exists and is not a graph folder; choose a new path")

    @property
    def changes(self) -> list[Any]:
        from gemmascope.circuits.intervene import Change

        return [Change.parse(s, ablate=True) for s in self.ablate] + [
            Change.parse(s, ablate=False) for s in self.steer
        ]


def run_graph(job: GraphJob) -> dict[str, Any]:
    """Load, attribute, prune, save; then the interventions. Returns what the CLI prints."""
    from gemmascope import io
    from gemmascope.circuits.attribution import _ids, attribute
    from gemmascope.circuits.intervene import intervene
    from gemmascope.clt import CLT
    from gemmascope.common.devices import resolve_device
    from gemmascope.models import load_model

    transcoders = io.load_transcoders(
        job.transcoders, job.pick
    )  # bad folders fail before the model
    model, tokenizer = load_model(job.model, device=resolve_device(job.device))
    device = next(model.parameters()).device
    transcoders = (
        transcoders.to(device)
        if isinstance(transcoders, CLT)
        else [t.to(device) for t in transcoders]
    )
    graph = attribute(model, tokenizer, job.prompt, transcoders, max_logits=job.max_logits,
                      logit_prob=job.logit_prob, batch_size=job.batch_size,
                      max_feature_nodes=job.max_feature_nodes)  # fmt: skip
    graph.info.update(model=job.model, transcoders=str(job.transcoders), scores=graph.scores())
    slug = job.slug or re.sub(r"[^a-z0-9]+", "-", job.prompt.lower()).strip("-")[:60] or "graph"
    frontend = graph.frontend_json(slug, scan=str(job.transcoders), node_threshold=job.node_threshold,
                                   edge_threshold=job.edge_threshold)  # fmt: skip
    graph.save(job.out, frontend)
    result: dict[str, Any] = {"graph": graph, "frontend": frontend}
    if job.changes:
        ids = _ids(tokenizer, job.prompt).to(device)
        result["intervention"] = intervene(model, ids, transcoders, job.changes)
        result["decode"] = lambda i: tokenizer.decode([i])
    print(f"wrote {job.out}", file=sys.stderr)
    return result
