"""A `gemmascope train` run: the SAEs (a sweep file and/or a grid), where the activations come
from (a cache, or the model streamed), the shared hyper-parameters, and the run folder."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from gemmascope.common import distributed
from gemmascope.common.config import nested, option
from gemmascope.sae import SAE
from gemmascope.train.config import SAESpec, TrainConfig, TrainFlags
from gemmascope.train.loop import train
from gemmascope.train.sweep import Grid, load_sweep


@dataclass
class TrainJob:
    """Train many SAEs (sites x layers x widths x sparsities) from one read of the activations."""

    out: Path
    """Run folder: metrics.jsonl, checkpoint/, one folder per SAE."""
    spec: Path | None = None
    """Sweep file (YAML/TOML): `saes`, `sweep`, `train`, `source`. Flags add to it."""
    activations: Path | None = None
    """Read a cache written by `gemmascope cache` (else stream from --model)."""
    model: str = "gemma-3-270m"
    """Model to stream activations from (no cache)."""
    corpus: str = "default"
    """Corpus when streaming from the model."""
    grid: Grid = nested(Grid)
    """The SAEs given by flags."""
    train: TrainConfig = nested(TrainFlags)
    """Hyper-parameters every SAE shares."""
    resume: bool = False
    """Continue the run in --out from its checkpoint."""
    given: frozenset[str] = option(frozenset(), cli=False)
    """The train options typed as flags: they win over the sweep file's."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)


def run_job(job: TrainJob) -> dict[str, SAE]:
    """Load the sweep file, the data and the model (when streaming), then `train`; the SAEs by name."""
    specs, options, source = load_sweep(job.spec) if job.spec else ([], {}, {})
    flags = {f.name: getattr(job.train, f.name) for f in dataclasses.fields(TrainConfig)}
    options = {**options, **{k: v for k, v in flags.items() if k in job.given or k not in options}}
    cfg = TrainConfig(**options)  # bad options fail here, before any loading
    activations = job.activations or (
        Path(source["activations"]) if "activations" in source else None
    )
    grid_specs = job.grid.specs(10**6)  # layer numbers are checked against the data below
    specs = [*specs, *grid_specs]
    if not specs:
        raise ValueError(
            "no SAEs to train: pass --spec FILE or --layers with a sparsity (--target-l0, --k, ...)"
        )
    keys = sorted({key for s in specs for key in s.keys})
    if activations is not None:
        from gemmascope.activations import CachedActivations

        data = CachedActivations(activations, keys, batch_size=cfg.batch_size, seed=cfg.seed)
        ident = data.manifest["identity"]
        n_layers = ident.get("model", {}).get("n_layers")
        record = {
            "model": ident.get("model", {}).get("name"),
            "context_size": ident.get("context_size"),
            "dataset": str(ident.get("corpus", {}).get("source", "")) or None,
        }
    else:
        from gemmascope.activations import ModelActivations
        from gemmascope.common.devices import resolve_device
        from gemmascope.hooks import decoder_layers
        from gemmascope.models import load_model

        name, corpus = source.get("model", job.model), source.get("corpus", job.corpus)
        lm, tok = load_model(name, device=resolve_device(cfg.device))
        data = ModelActivations(lm, tok, keys, corpus=corpus, batch_size=cfg.batch_size,
                                seed=cfg.seed)  # fmt: skip
        record = {"model": name, "dataset": corpus, "context_size": data.context_size}
        n_layers = len(decoder_layers(lm))
    specs = [_resolved(s, n_layers) for s in specs]
    cfg = dataclasses.replace(cfg, **{k: v for k, v in record.items() if options.get(k) is None})
    if distributed.is_main():  # under torchrun, one rank speaks
        print(f"training {len(specs)} SAE(s) on {cfg.tokens:,} tokens: {dataclasses.asdict(cfg)}",
              file=sys.stderr)  # fmt: skip
    _check_memory(specs, cfg, data)
    return train(specs, data.batches, cfg, job.out, resume=job.resume)


def _resolved(spec: SAESpec, n_layers: int | None) -> SAESpec:
    """`spec` with its named L0 size resolved, which needs the model's layer count."""
    if spec.l0_size is not None and spec.target_l0 is None and n_layers is None:
        raise ValueError(
            f"{spec.name}: the cache does not record its model's layer count, which the L0 size "
            f"{spec.l0_size!r} needs; give --target-l0 instead"
        )
    return spec.resolve(n_layers) if n_layers else spec


def _check_memory(specs: list[SAESpec], cfg: TrainConfig, data) -> None:
    """Print the run's memory plan and refuse one that cannot fit, before any SAE is made. Off the
    CPU the SAEs live in the device's memory, which the device's own allocator reports."""
    from gemmascope.common.devices import resolve_device
    from gemmascope.train.memory import plan_memory

    if resolve_device(cfg.device).type != "cpu":
        return
    world = distributed.world_size()
    plan = plan_memory(specs, cfg, data.widths, data_bytes=data.memory_bytes(),
                       ranks=world if cfg.parallel == "latents" else 1,
                       data_parallel=world > 1 and cfg.parallel == "data",
                       local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # fmt: skip
    if distributed.is_main():
        print(plan, file=sys.stderr)
    plan.check(specs, cfg)
