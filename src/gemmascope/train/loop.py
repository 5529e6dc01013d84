"""Train many SAEs from one stream of activations: the Gemma Scope recipe, sparse and resumable.

The loop in `train` reads top to bottom: a batch of activations for every site -> one step of every
SAE on its site -> log -> checkpoint -> export. Each batch is read once and fed to every SAE that
wants it, so a sweep over widths and sparsities costs one read of the data. The math of each step
lives in `objectives` (sparse CPU kernels) and `dense` (autograd, for GPUs); the state of each SAE,
its placement on the ranks and its checkpoints in `state`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from gemmascope import io
from gemmascope.common import distributed
from gemmascope.common.devices import resolve_device
from gemmascope.common.distributed import Partition
from gemmascope.common.files import read_json, write_json
from gemmascope.common.progress import progress_bar
from gemmascope.models import SiteKey
from gemmascope.sae import SAE
from gemmascope.train import step as step_module
from gemmascope.train.batches import Batches
from gemmascope.train.checkpoint import load_checkpoint, save_checkpoint
from gemmascope.train.config import RECIPES, SAESpec, TrainConfig
from gemmascope.train.cross_layer import clt_forward_backward, dense_clt_forward_backward
from gemmascope.train.dense import dense_forward_backward
from gemmascope.train.objectives import StepStats
from gemmascope.train.optim import RowAdam, catch_up
from gemmascope.train.state import (
    Norm,
    Run,
    adam_update,
    estimate_norms,
    export,
    new_run,
    partition_of,
    place,
    release_optimizer,
    unplace,
    write_run_config,
)
from gemmascope.train.step import forward_backward


def train(
    specs: list[SAESpec],
    batches: Batches,
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, SAE]:
    """Train every SAE in `specs` from one read of `batches`; write them under `out`.

    Args:
        specs: the SAEs; sites they read and reconstruct must be in every batch.
        batches: `batches(start)` yields batch dicts from index `start` (deterministic, for resume).
        cfg: shared hyper-parameters.
        out: run folder: `metrics.jsonl`, `checkpoint/`, and one SAE folder per spec.
        resume: continue from `out/checkpoint` if present (same result as an uninterrupted run).
    Returns:
        The trained SAEs by spec name, weights folded to take raw activations.
    """
    out = Path(out)
    device = resolve_device(cfg.device)
    distributed.init(device)
    split, main = partition_of(cfg, specs), distributed.is_main()
    if resume:
        _same_run(out, specs, cfg)
        if (finished := _finished(out, specs)) is not None:
            return finished
    start, norms, runs, stream = _begin(specs, batches, cfg, out, resume)
    for run in runs:
        place(run, split, device)
    with _Logger(out, runs, cfg, split, start, enabled=main, bar=progress and main) as logger:
        for step, batch in zip(range(start, cfg.steps), stream, strict=False):
            lr = cfg.lr_at(step)
            if split.rows:  # data parallel: this rank's rows of the global batch
                batch = {k: v[slice(*distributed.shard_range(len(v)))] for k, v in batch.items()}
            for run in runs:
                stats = _train_step(run, batch, norms, cfg, step, lr, split)
                _finite(stats, run, step, out)
                _accumulate(run, stats)
            logger.after(step + 1, lr)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(out / "checkpoint", runs, norms, step + 1, split)
    return _export(runs, norms, cfg, out, split)


def _finite(stats: StepStats, run: Run, step: int, out: Path) -> None:
    """Stop at the first non-finite step: a NaN only spreads from there, and nothing is saved."""
    if math.isfinite(stats.loss):
        return
    ckpt = out / "checkpoint" / "state.json"
    kept = (
        f"the last checkpoint ({ckpt.parent}, step {json.loads(ckpt.read_text())['step']}) is kept"
        if ckpt.exists()
        else "no checkpoint was written yet"
    )
    raise RuntimeError(
        f"{run.spec.name}: non-finite loss ({stats.loss}) at step {step}; no SAE was saved and "
        f"{kept}. Look for NaN/inf in the activations (`gemmascope cache --verify`) or lower the "
        "learning rate, then rerun (with --resume to start from that checkpoint)"
    )


RUNTIME = ("device", "parallel", "log_every", "checkpoint_every", "recipe", "block_latents")
"""Training options a resume may change: they do not change the SAEs (`recipe` only fills in
options, which are compared themselves; `block_latents` only the order of float sums)."""
BEFORE_RECIPES = {**RECIPES["paper"], "max_frequency": 0.1}
"""What the options added with the recipes were in a run saved before them."""


def _same_run(out: Path, specs: list[SAESpec], cfg: TrainConfig) -> None:
    """Refuse to resume a run made with other options or other SAEs, naming what differs, so the
    config saved with each SAE is the one it was trained with."""
    file = out / "train_config.json"
    if not file.exists():
        return
    saved = read_json(file)
    theirs, mine = saved.get("train", {}), dataclasses.asdict(cfg)
    diffs = [
        (k, theirs.get(k, BEFORE_RECIPES.get(k)), v)
        for k, v in mine.items()
        if k not in RUNTIME and theirs.get(k, BEFORE_RECIPES.get(k, v)) != v
    ]
    their_saes, my_saes = saved.get("saes", []), [dataclasses.asdict(s) for s in specs]
    if len(their_saes) != len(my_saes):
        diffs.append(("saes", f"{len(their_saes)} SAEs", f"{len(my_saes)}"))
    for i, (a, b) in enumerate(zip(their_saes, my_saes, strict=False)):
        diffs += [(f"saes[{i}].{k}", a.get(k), v) for k, v in b.items() if a.get(k, v) != v]
    if diffs:
        detail = "; ".join(f"{k}: the run has {a!r}, this one {b!r}" for k, a, b in diffs)
        raise ValueError(
            f"{out}: cannot resume, it was started with other settings ({detail}). Rerun with the "
            "same ones, or train into a new folder"
        )


def _finished(out: Path, specs: list[SAESpec]) -> dict[str, SAE] | None:
    """The SAEs of a run that already finished with these specs, as it saved them."""
    marker = out / "complete.json"
    names = sorted(s.name for s in specs)
    if marker.exists() and sorted(json.loads(marker.read_text())["saes"]) == names:
        return {name: io.load(out / name) for name in names}
    return None


def _begin(
    specs: list[SAESpec], batches: Batches, cfg: TrainConfig, out: Path, resume: bool
) -> tuple[int, dict[SiteKey, Norm], list[Run], Iterator[dict[SiteKey, Tensor]]]:
    """The first step, the input normalisation, every SAE's state and the batches from there:
    from the checkpoint when resuming, else new (the normalisation estimated on the first batches)."""
    unresolved = [s.name for s in specs if s.target_l0 is None and s.l0_size is not None]
    if unresolved:
        raise ValueError(
            f"{unresolved}: a named L0 size needs the model's layer count: pass "
            "`spec.resolve(n_layers)` (the `train` command does)"
        )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two SAEs in the sweep share a name: {sorted(names)}")
    ckpt = out / "checkpoint"
    if resume and (ckpt / "state.json").exists():
        start, norms, runs = load_checkpoint(ckpt, specs, cfg)
        return start, norms, runs, batches(start)
    if not resume and ((ckpt / "state.json").exists() or (out / "complete.json").exists()):
        raise ValueError(
            f"{out} already holds a run; pass `resume=True` (--resume) or use another folder"
        )
    stream = batches(0)
    first = list(itertools.islice(stream, min(cfg.norm_batches, cfg.steps)))
    _check_sites(specs, first[0])
    norms = estimate_norms(first, cfg.center, cfg.standardize)
    for key, norm in norms.items():
        if not (math.isfinite(norm.scale) and bool(torch.isfinite(norm.mean).all())):
            raise ValueError(
                f"layer {key[0]} {key[1]}: non-finite activations (NaN or inf) among the first "
                f"{len(first)} batches, from which the input scale is estimated; check the data"
            )
    runs = [new_run(s, first[0][s.source].shape[-1], cfg, i) for i, s in enumerate(specs)]
    if distributed.is_main():
        write_run_config(out, specs, cfg)
    return 0, norms, runs, itertools.chain(first, stream)


def _export(
    runs: list[Run], norms: dict[SiteKey, Norm], cfg: TrainConfig, out: Path, split: Partition
) -> dict[str, SAE]:
    """Gather every SAE at full width on rank 0, fold the normalisation in, save them."""
    for run in runs:
        release_optimizer(run)  # the run ends here: its Adam state is not gathered nor kept
        unplace(run, split)
    if not distributed.is_main():
        distributed.barrier()  # until rank 0 has written the SAEs
        return {}
    saes = {r.spec.name: export(r, norms, cfg) for r in runs}
    for name, sae in saes.items():
        io.save(sae, out / name)
    write_json(out / "complete.json", {"saes": sorted(saes), "steps": cfg.steps})
    distributed.barrier()
    return saes


class _Logger:
    """metrics.jsonl, TensorBoard when installed, and the progress bar (rank 0 only)."""

    def __init__(self, out: Path, runs: list[Run], cfg: TrainConfig, split: Partition, start: int,
                 *, enabled: bool, bar: bool) -> None:  # fmt: skip
        self.runs, self.cfg, self.split = runs, cfg, split
        self.log = open(out / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115 - closed in __exit__
        self.board = _tensorboard(out) if enabled else None
        self.bar = progress_bar(cfg.steps, initial=start, unit="step", desc="train", enabled=bar)
        self.t0, self.tokens0 = time.perf_counter(), start * cfg.batch_size

    def __enter__(self) -> _Logger:
        return self

    def after(self, done: int, lr: float) -> None:
        """Called after step `done` - 1: every `log_every` steps, write the averages since the last."""
        cfg = self.cfg
        if done % cfg.log_every == 0 or done == cfg.steps:
            tok_s = (done * cfg.batch_size - self.tokens0) / (time.perf_counter() - self.t0)
            _log(self.log, self.board, self.runs, done, cfg, lr, tok_s, self.split)
            last = self.runs[0].sums.get("last", {})
            self.bar.set_postfix(tok_s=f"{tok_s:,.0f}", fvu=last.get("fvu"), l0=last.get("l0"))
        self.bar.update(1)

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()
        if self.board is not None:
            self.board.close()


def _check_sites(specs: list[SAESpec], batch: dict[SiteKey, Tensor]) -> None:
    for s in specs:
        for key in s.keys:
            if key not in batch:
                raise ValueError(
                    f"{s.name}: the activations have no layer {key[0]} site {key[1]!r}; "
                    f"available: {sorted(batch)}"
                )
        d_in, d_out = batch[s.source].shape[-1], batch[s.target].shape[-1]
        if d_in != d_out:
            raise ValueError(
                f"{s.name}: {s.site} is {d_in} wide but {s.target_site} is {d_out}; a transcoder "
                "here maps a site to one of the same width (mlp_in -> mlp_out)"
            )


def _train_step(
    run: Run,
    batch: dict[SiteKey, Tensor],
    norms: dict[SiteKey, Norm],
    cfg: TrainConfig,
    step: int,
    lr: float,
    split: Partition = Partition(),  # noqa: B008 - frozen
):
    spec = run.spec
    device = run.params.b_dec.device
    x, y = _inputs(spec, batch, norms, device)
    if spec.l0_coefficient is not None:
        run.objective.coefficient = cfg.coefficient_at(step, spec.l0_coefficient)
    elif spec.target_l0 is not None:
        run.objective.coefficient = cfg.coefficient_at(step, 1.0)
    if spec.n_layers is None:  # on a CLT it kills most latents (docs/circuits.md): not applied
        run.objective.frequency_coefficient = cfg.coefficient_at(step, cfg.frequency_penalty)
    dead_after = min(cfg.dead_tokens, cfg.tokens // 4)
    tokens = step * cfg.batch_size
    dead = (tokens - run.last_fired) >= dead_after if tokens >= dead_after else None
    # CPU: sparse numba kernels; GPU/MPS: dense autograd with the same estimators.
    if spec.n_layers is None:
        step_fn = forward_backward if device.type == "cpu" else dense_forward_backward
    else:
        step_fn = clt_forward_backward if device.type == "cpu" else dense_clt_forward_backward
    if step_fn is step_module.forward_backward and not split.rows:  # Adam block by block
        run.objective.block = cfg.encoder_block
        sink = RowAdam(run.params, run.adam_v, run.adam_last, lr=lr, threshold_lr=cfg.threshold_lr,
                       beta1=cfg.beta1, beta2=cfg.beta2, step=step)  # fmt: skip
        stats = step_fn(run.params, x, y, run.objective, dead, split, sink)
    else:
        stats = step_fn(run.params, x, y, run.objective, dead, split)
        if split.rows:  # each rank's gradient is its rows' share of the global batch's: sum them
            for q in run.params.parameters():
                distributed.all_reduce_sum(q.grad)
        if run.adam_last is not None:  # rows a sparse step left behind (after a resume)
            catch_up(run.adam_v, run.adam_last, cfg.beta2, step)
        adam_update(run, lr, cfg, step)
        if run.adam_last is not None:
            run.adam_last.fill_(step + 1)
    run.last_fired[stats.fired > 0] = tokens + cfg.batch_size
    if spec.architecture == "batchtopk":
        b = run.batchtopk_threshold
        run.batchtopk_threshold = (
            stats.min_selected if b == 0 else 0.99 * b + 0.01 * stats.min_selected
        )
    return stats


def _inputs(spec: SAESpec, batch: dict[SiteKey, Tensor], norms: dict[SiteKey, Norm],
            device: torch.device) -> tuple[Tensor, Tensor] | tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """What a step reads and predicts, normalised: `[B, d]` each, or per layer for a CLT."""
    get = lambda key: norms[key](batch[key].to(device))  # noqa: E731
    if spec.n_layers is not None:
        return [get((i, spec.site)) for i in spec.layers], [
            get((i, spec.target_site)) for i in spec.layers
        ]
    x = get(spec.source)
    return x, (x if spec.target == spec.source else get(spec.target))


def _accumulate(run: Run, stats: StepStats) -> None:
    s = run.sums
    for key in ("loss", "mse", "fvu", "l0"):
        s[key] = s.get(key, 0.0) + getattr(stats, key)
    s["n"] = s.get("n", 0) + 1


def _tensorboard(out: Path):
    """A TensorBoard writer under `out/tensorboard` when the `tensorboard` package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _log(
    log,
    board,
    runs: list[Run],
    step: int,
    cfg: TrainConfig,
    lr: float,
    tok_s: float,
    split: Partition = Partition(),  # noqa: B008 - frozen
) -> None:
    """Average the sums since the last log; rank 0 (the one with a `log`) writes them."""
    tokens = step * cfg.batch_size
    dead_after = min(cfg.dead_tokens, cfg.tokens // 4)
    for run in runs:
        s = run.sums
        n = max(s.pop("n", 1), 1)
        rec = {k: s.pop(k) / n for k in ("loss", "mse", "fvu", "l0") if k in s}
        s.clear()
        s["last"] = {k: round(v, 4) for k, v in rec.items()}
        n_dead = ((tokens - run.last_fired) >= dead_after).sum()
        width = run.spec.width * (run.spec.n_layers or 1)  # a CLT's latents of every layer
        dead = float(split.over_latents(n_dead)) / width if tokens >= dead_after else 0.0
        if log is None:
            continue
        coefficient = run.objective.coefficient
        log.write(
            json.dumps(
                {
                    "sae": run.spec.name,
                    "step": step,
                    "tokens": tokens,
                    **rec,
                    "dead_fraction": dead,
                    "lr": lr,
                    "coefficient": coefficient,
                    "tokens_per_s": tok_s,
                }
            )
            + "\n"
        )
        if board is not None:
            for key, value in {
                **rec,
                "dead_fraction": dead,
                "lr": lr,
                "coefficient": coefficient,
            }.items():
                board.add_scalar(f"{run.spec.name}/{key}", value, tokens)
    if log is not None:
        log.flush()
