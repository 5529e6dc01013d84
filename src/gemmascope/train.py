"""Train many SAEs from one stream of activations: the Gemma Scope recipe, sparse and resumable.

The loop reads top to bottom: a batch of activations for every site -> one step of every SAE on its
site -> log -> checkpoint. Each batch is read once and fed to every SAE that wants it, so a sweep over
widths and sparsities costs one read of the data. The math of each step lives in `objectives.py`
(sparse CPU kernels) and `dense.py` (autograd, for GPUs). Under torchrun each step is split over the
ranks by batch rows or by latents (`distributed.Split`) with one process's result.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from gemmascope import distributed
from gemmascope.dense import dense_forward_backward
from gemmascope.distributed import Split
from gemmascope.io.atomic import atomic_dir, write_json
from gemmascope.objectives import Objective, Params, StepStats, forward_backward
from gemmascope.optim import adam_step
from gemmascope.sae import SAE, SAEConfig

SiteKey = tuple[int, str]
Batches = Callable[[int], Iterator[dict[SiteKey, Tensor]]]
"""`batches(start)` yields `{(layer, site): [batch_size, width]}` from batch index `start` on."""


@dataclass
class SAESpec:
    """One SAE of a sweep."""

    layer: int
    site: str
    width: int
    architecture: Literal["jumprelu", "topk", "batchtopk", "relu"] = "jumprelu"
    l0_coefficient: float | None = None
    """lambda of the L0 penalty (jumprelu), the L1 penalty (relu) or the target-L0 penalty."""
    target_l0: float | None = None
    """jumprelu: aim for this L0 with a quadratic penalty instead of a fixed lambda."""
    k: int | None = None
    """topk/batchtopk: active latents per token."""
    target_site: str | None = None
    """Transcoder: reconstruct this site of the same layer (e.g. `mlp_out` from `resid_mid`)."""
    aux_k: int = 0
    """topk/batchtopk: dead latents used by the AuxK loss (0 = off)."""

    def __post_init__(self) -> None:
        where = f"SAE at layer {self.layer} {self.site} width {self.width}"
        if self.architecture not in ("jumprelu", "topk", "batchtopk", "relu"):
            raise ValueError(
                f"{where}: unknown architecture {self.architecture!r}; "
                "choose jumprelu, topk, batchtopk or relu"
            )
        if (
            self.architecture == "jumprelu"
            and self.l0_coefficient is None
            and self.target_l0 is None
        ):
            raise ValueError(f"{where}: jumprelu needs `l0_coefficient` or `target_l0`")
        if self.architecture in ("topk", "batchtopk") and not self.k:
            raise ValueError(f"{where}: {self.architecture} needs `k`")
        if self.architecture == "relu" and self.l0_coefficient is None:
            raise ValueError(f"{where}: relu needs `l0_coefficient` (its L1 coefficient)")

    @property
    def source(self) -> SiteKey:
        return (self.layer, self.site)

    @property
    def target(self) -> SiteKey:
        return (self.layer, self.target_site or self.site)

    @property
    def name(self) -> str:
        arch = self.architecture
        if self.k:
            sparsity = f"k{self.k}"
        elif self.target_l0 is not None:
            sparsity = f"l0_{self.target_l0:g}"
        else:
            sparsity = f"lambda{self.l0_coefficient:g}"
        tc = f"_to_{self.target_site}" if self.target_site else ""
        return f"layer_{self.layer}_{self.site}{tc}_w{self.width}_{arch}_{sparsity}"


@dataclass
class TrainConfig:
    """Hyper-parameters shared by every SAE of a run. Defaults are Gemma Scope's (App. B)."""

    tokens: int = 2_000_000
    """Activation vectors to train on."""
    batch_size: int = 4096
    lr: float = 7e-5
    lr_warmup_steps: int = 1000
    """Cosine warm-up from 0.1*lr; never longer than 5% of a short run."""
    l0_warmup_steps: int = 10_000
    """Linear warm-up of the sparsity coefficient from 0; never longer than 25% of a short run."""
    beta1: float = 0.0
    beta2: float = 0.999
    bandwidth: float = 0.001
    threshold_init: float = 0.001
    encoder_init_scale: float = 1.0
    """W_enc = scale * W_dec^T at init. The recipe's 1 starts with about half the latents firing and a
    reconstruction ~m/(2d) times too large, which a long run forgets; 0.1 (like SAELens' 0.1 decoder
    norm) makes the dense start a few steps long, which short runs need."""
    center: bool = False
    """Also subtract each site's mean, estimated with C before training and folded into b_enc and
    b_dec after it (encodings unchanged). Not in the recipe; Gemma 3's residual stream is mostly one
    constant direction, which otherwise costs short runs dense latents and dead ones."""
    standardize: bool = False
    """Subtract each site's mean and divide each dimension by its standard deviation (floored at 1%
    of the median), estimated before training and folded into the weights after it (encodings
    unchanged). Not in the recipe: the loss then weighs every dimension alike instead of being
    dominated by the few massive ones of Gemma's residual stream, which the model mostly normalises
    away (see bench/sensitivity.py). Implies `center`."""
    norm_batches: int = 8
    """Batches used to estimate the input scale C with E||x/C||^2 = 1 before training."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired in this many tokens counts as dead (capped at a quarter of the run)."""
    matmul_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the dense products (CPU: the encoder matmul; GPU: encoder and decoder); parameters,
    thresholds and Adam states stay float32."""
    device: str = "auto"
    """cpu (sparse numba kernels), cuda, cuda:N, mps (torch path), or auto: this rank's GPU if any."""
    parallel: Literal["data", "latents"] = "data"
    """Under torchrun: split each batch's rows over the ranks (data), or each SAE's latents (latents:
    for SAEs too wide for one device). Either way the result equals one process's."""
    max_density: float = 0.02
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    dataset: str | None = None
    context_size: int | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.tokens < self.batch_size:
            raise ValueError(
                f"`tokens`={self.tokens} is less than one batch (`batch_size`={self.batch_size})"
            )
        distributed.check_device(self.device)
        if self.matmul_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"`matmul_dtype` {self.matmul_dtype!r}: choose float32, bfloat16 or float16"
            )
        if self.parallel not in ("data", "latents"):
            raise ValueError(f"`parallel` {self.parallel!r}: choose data or latents")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def lr_at(self, step: int) -> float:
        warm = min(self.lr_warmup_steps, max(1, self.steps // 20))
        if step >= warm:
            return self.lr
        return self.lr * (0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * step / warm)))

    def coefficient_at(self, step: int, final: float) -> float:
        warm = min(self.l0_warmup_steps, max(1, self.steps // 4))
        return final * min(1.0, step / warm)


@dataclass
class Run:
    """The training state of one SAE."""

    spec: SAESpec
    params: Params
    objective: Objective
    adam_v: dict[str, Tensor]
    last_fired: Tensor  # (m,) token count when each latent last fired
    batchtopk_threshold: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)


def _adam(run: Run, lr: float, cfg: TrainConfig, step: int) -> None:
    """Adam with beta1 = 0 by default (Gemma Scope); decoder rows stay unit-norm (see `optim`)."""
    p = run.params
    for name, q in p.named_parameters():
        m = run.adam_v.setdefault(f"{name}.m", torch.zeros_like(q)) if cfg.beta1 > 0 else None
        adam_step(q, run.adam_v[name], m, lr=lr, beta1=cfg.beta1, beta2=cfg.beta2, step=step,
                  unit_rows=q is p.W_dec)  # fmt: skip
    p.threshold.data.clamp_(min=0.0)


def _new_run(spec: SAESpec, d_in: int, cfg: TrainConfig, index: int) -> Run:
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    params = Params(d_in, spec.width, cfg.threshold_init, gen, cfg.encoder_init_scale)
    objective = Objective(
        architecture=spec.architecture,
        target_l0=spec.target_l0,
        k=spec.k,
        bandwidth=cfg.bandwidth,
        aux_k=spec.aux_k,
        max_density=cfg.max_density,
        matmul_dtype=getattr(torch, cfg.matmul_dtype),
    )
    adam_v = {n: torch.zeros_like(q) for n, q in params.named_parameters()}
    return Run(spec, params, objective, adam_v, torch.zeros(spec.width, dtype=torch.int64))


@dataclass
class Norm:
    """How one site's activations are normalised for training: x_n = (x - mean) / (scale * dims)."""

    mean: Tensor
    scale: float
    dims: Tensor | None = None
    """Per-dimension divisor with root mean square 1 (`standardize`), or None."""

    def divisor(self) -> Tensor:
        """`[d]`: what each dimension is divided by after the mean is subtracted."""
        ones = torch.ones_like(self.mean)
        return self.scale * (ones if self.dims is None else self.dims.to(self.mean.device))

    def __call__(self, x: Tensor) -> Tensor:
        x = x.float() - self.mean.to(x.device)
        if self.dims is not None:
            x = x / self.dims.to(x.device)
        return x / self.scale


def estimate_norms(
    first: list[dict[SiteKey, Tensor]], center: bool, standardize: bool = False
) -> dict[SiteKey, Norm]:
    """Per site: the mean (zero unless `center` or `standardize`), the per-dimension divisors
    (`standardize`) and C such that E||x_n||^2 = 1."""
    norms = {}
    for k in first[0]:
        x = torch.cat([b[k].float() for b in first])
        mean = x.mean(0) if center or standardize else torch.zeros(x.shape[-1])
        dims = None
        if standardize:
            std = (x - mean).pow(2).mean(0).sqrt()
            std = std.clamp_min(0.01 * float(std.median()) + 1e-12)
            dims = std / std.pow(2).mean().sqrt()
        centred = (x - mean) if dims is None else (x - mean) / dims
        norms[k] = Norm(mean, float(centred.pow(2).sum(-1).mean().sqrt()), dims)
    return norms


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
    device = distributed.resolve_device(cfg.device)
    distributed.init(device)
    split = _split(cfg, specs)
    main = distributed.is_main()
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two SAEs in the sweep share a name: {sorted(names)}")
    ckpt = out / "checkpoint"
    start, norms, runs = 0, {}, []
    done_marker = out / "complete.json"
    if resume and done_marker.exists():  # finished before: hand back what was saved
        from gemmascope.io import load

        saved = json.loads(done_marker.read_text())["saes"]
        if sorted(saved) == sorted(names):
            return {name: load(out / name) for name in names}
    if resume and (ckpt / "state.json").exists():
        start, norms, runs = _load_checkpoint(ckpt, specs, cfg)
    elif not resume and ((ckpt / "state.json").exists() or done_marker.exists()):
        raise ValueError(
            f"{out} already holds a run; pass `resume=True` (--resume) or use another folder"
        )
    stream = batches(start)
    if not runs:
        first = list(itertools.islice(stream, min(cfg.norm_batches, cfg.steps)))
        _check_sites(specs, first[0])
        norms = estimate_norms(first, cfg.center, cfg.standardize)
        runs = [_new_run(s, first[0][s.source].shape[-1], cfg, i) for i, s in enumerate(specs)]
        stream = itertools.chain(first, stream)
        if main:
            _write_config(out, specs, cfg)
    for run in runs:
        _place(run, split, device)

    log = open(out / "metrics.jsonl", "a") if main else None  # noqa: SIM115 - closed in finally
    board = _tensorboard(out) if main else None
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        disable=not (progress and main),
        unit="step",
        dynamic_ncols=True,
    )
    t0, tokens0 = time.perf_counter(), start * cfg.batch_size
    try:
        for step, batch in zip(range(start, cfg.steps), stream, strict=False):
            lr = cfg.lr_at(step)
            if split.rows:  # data parallel: this rank's rows of the global batch
                batch = {k: v[slice(*distributed.shard_range(len(v)))] for k, v in batch.items()}
            for run in runs:
                stats = _train_step(run, batch, norms, cfg, step, lr, split)
                _accumulate(run, stats)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                tok_s = (done * cfg.batch_size - tokens0) / (time.perf_counter() - t0)
                _log(log, board, runs, done, cfg, lr, tok_s, split)
                first_run = runs[0].sums.get("last", {})
                bar.set_postfix(
                    tok_s=f"{tok_s:,.0f}", fvu=first_run.get("fvu"), l0=first_run.get("l0")
                )
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _save_checkpoint(ckpt, runs, norms, done, split)
            bar.update(1)
    finally:
        bar.close()
        if log is not None:
            log.close()
        if board is not None:
            board.close()
    for run in runs:  # rank 0 gathers every SAE at full width, on the CPU
        _unplace(run, split)
    if not main:
        distributed.barrier()  # until rank 0 has written the SAEs
        return {}
    saes = {r.spec.name: export(r, norms, cfg) for r in runs}
    for name, sae in saes.items():
        sae.save(out / name)
    write_json(done_marker, {"saes": sorted(saes), "steps": cfg.steps})
    distributed.barrier()
    return saes


def _split(cfg: TrainConfig, specs: list[SAESpec]) -> Split:
    """How this run's steps are shared among the ranks (none without torchrun)."""
    world = distributed.world_size()
    if world == 1:
        return Split()
    if cfg.parallel == "data":
        return Split(rows=True)
    for s in specs:
        if s.k and s.width // world < s.k:
            raise ValueError(
                f"{s.name}: {world} ranks leave {s.width // world} latents each, fewer than k; "
                "use fewer ranks or `parallel` data"
            )
    return Split(latents=True)


# Which dimension of each parameter indexes latents; b_dec has none: every rank holds all of it.
_LATENT_DIM = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "threshold": 0, "last_fired": 0}


def _place(run: Run, split: Split, device: torch.device) -> None:
    """Move a full-width run to `device`, keeping only this rank's latents when they are split."""
    lo, hi = distributed.shard_range(run.spec.width) if split.latents else (0, run.spec.width)

    def take(name: str, t: Tensor) -> Tensor:
        dim = _LATENT_DIM.get(name.split(".")[0])
        if dim is not None:
            t = t.narrow(dim, lo, hi - lo)
        if name.startswith("W_enc"):  # one latent per row of memory, as its gradient is made
            return t.T.contiguous().T.to(device)
        return t.contiguous().to(device)

    with torch.no_grad():
        for n, q in run.params.named_parameters():
            q.data = take(n, q.data)
    run.adam_v = {n: take(n, v) for n, v in run.adam_v.items()}
    run.last_fired = take("last_fired", run.last_fired)


def _full_state(run: Run, split: Split) -> dict[str, Tensor]:
    """Parameters, Adam state and counters at full width on the CPU, on rank 0 (empty elsewhere).

    Every rank must call it: with latents split, rank 0 gathers the slices one tensor at a time.
    """
    state = {f"params.{n}": q.detach() for n, q in run.params.named_parameters()}
    state.update({f"adam.{n}": v for n, v in run.adam_v.items()})
    state["last_fired"] = run.last_fired
    full = {}
    for key, t in state.items():
        dim = _LATENT_DIM.get(key.split(".")[-2] if key.endswith(".m") else key.split(".")[-1])
        if split.latents and dim is not None:
            t = distributed.gather_cat(t.contiguous(), dim)
        if t is not None:
            full[key] = t.cpu().contiguous()
    return full if distributed.is_main() else {}


def _unplace(run: Run, split: Split) -> None:
    """Bring a run back to the CPU at full width on rank 0 (for export)."""
    state = _full_state(run, split)
    if not state:
        return
    with torch.no_grad():
        for n, q in run.params.named_parameters():
            q.data = state[f"params.{n}"]
    run.adam_v = {k[len("adam.") :]: v for k, v in state.items() if k.startswith("adam.")}
    run.last_fired = state["last_fired"]


def _check_sites(specs: list[SAESpec], batch: dict[SiteKey, Tensor]) -> None:
    for s in specs:
        for key in {s.source, s.target}:
            if key not in batch:
                raise ValueError(
                    f"{s.name}: the activations have no layer {key[0]} site {key[1]!r}; "
                    f"available: {sorted(batch)}"
                )


def _train_step(
    run: Run,
    batch: dict[SiteKey, Tensor],
    norms: dict[SiteKey, Norm],
    cfg: TrainConfig,
    step: int,
    lr: float,
    split: Split = Split(),  # noqa: B008 - frozen
):
    spec = run.spec
    device = run.params.W_enc.device
    x = norms[spec.source](batch[spec.source].to(device))
    y = x if spec.target == spec.source else norms[spec.target](batch[spec.target].to(device))
    if spec.l0_coefficient is not None:
        run.objective.coefficient = cfg.coefficient_at(step, spec.l0_coefficient)
    elif spec.target_l0 is not None:
        run.objective.coefficient = cfg.coefficient_at(step, 1.0)
    dead_after = min(cfg.dead_tokens, cfg.tokens // 4)
    tokens = step * cfg.batch_size
    dead = (tokens - run.last_fired) >= dead_after if tokens >= dead_after else None
    # CPU: sparse numba kernels; GPU/MPS: dense autograd with the same estimators.
    step_fn = forward_backward if device.type == "cpu" else dense_forward_backward
    stats = step_fn(run.params, x, y, run.objective, dead, split)
    if split.rows:  # each rank's gradient is its rows' share of the global batch's: sum them
        for q in run.params.parameters():
            distributed.all_reduce_sum(q.grad)
    run.last_fired[stats.fired > 0] = tokens + cfg.batch_size
    if spec.architecture == "batchtopk":
        b = run.batchtopk_threshold
        run.batchtopk_threshold = (
            stats.min_selected if b == 0 else 0.99 * b + 0.01 * stats.min_selected
        )
    _adam(run, lr, cfg, step)
    return stats


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
    split: Split = Split(),  # noqa: B008 - frozen
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
        dead = float(split.over_latents(n_dead)) / run.spec.width if tokens >= dead_after else 0.0
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


def export(run: Run, norms: dict[SiteKey, Norm], cfg: TrainConfig) -> SAE:
    """Fold the input normalisation into the weights so the SAE takes raw activations (encodings
    unchanged): with s = C * dims, pre = ((x - mu) / s) W + b = x (W / s) + (b - (mu / s) W)."""
    spec, p = run.spec, run.params
    (mu_in, c_in), (mu_out, c_out) = (
        (norms[k].mean, norms[k].divisor()) for k in (spec.source, spec.target)
    )
    d_in = p.W_enc.shape[0]
    sae_cfg = SAEConfig(
        architecture=spec.architecture,
        d_in=d_in,
        d_sae=spec.width,
        k=spec.k,
        model=cfg.model,
        layer=spec.layer,
        site=spec.site,
        dataset=cfg.dataset,
        context_size=cfg.context_size,
        tokens_trained=cfg.steps * cfg.batch_size,
        extra={
            "trainer": "gemmascope",
            "spec": dataclasses.asdict(spec),
            "train_config": dataclasses.asdict(cfg),
            "input_scale_folded": norms[spec.source].scale,
            **(
                {"target_site": spec.target_site, "target_scale_folded": norms[spec.target].scale}
                if spec.target_site
                else {}
            ),
        },
    )
    with torch.no_grad():
        threshold = p.threshold.clone()
        if spec.architecture == "batchtopk":
            threshold = torch.full_like(threshold, run.batchtopk_threshold)
        arrays = {
            "W_enc": p.W_enc / c_in[:, None],
            "W_dec": p.W_dec * c_out,
            "b_enc": p.b_enc - (mu_in / c_in) @ p.W_enc,
            "b_dec": p.b_dec * c_out + mu_out,
            "threshold": threshold,
        }
    return SAE.from_arrays(sae_cfg, arrays, source=spec.name).eval()


def _write_config(out: Path, specs: list[SAESpec], cfg: TrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "train_config.json",
        {"train": dataclasses.asdict(cfg), "saes": [dataclasses.asdict(s) for s in specs]},
    )


def _save_checkpoint(
    ckpt: Path,
    runs: list[Run],
    norms: dict[SiteKey, Norm],
    step: int,
    split: Split = Split(),  # noqa: B008 - frozen
) -> None:
    """Weights, optimizer state and counters of every SAE at full width, written once (rank 0) as
    one atomic folder, so a run resumes on any number of ranks."""
    tensors: dict[str, Tensor] = {}
    extra = {}
    for i, run in enumerate(runs):
        for key, t in _full_state(run, split).items():
            tensors[f"{i}.{key}"] = t
        extra[run.spec.name] = {"index": i, "batchtopk_threshold": run.batchtopk_threshold}
    tensors.update({f"mean.{k[0]}.{k[1]}": n.mean.contiguous() for k, n in norms.items()})
    tensors.update(
        {f"dims.{k[0]}.{k[1]}": n.dims.contiguous() for k, n in norms.items() if n.dims is not None}
    )
    if not distributed.is_main():
        return
    with atomic_dir(ckpt) as tmp:
        save_file(tensors, tmp / "state.safetensors")
        state = {
            "step": step,
            "scales": [[k[0], k[1], n.scale] for k, n in norms.items()],
            "runs": extra,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2))


def _load_checkpoint(ckpt: Path, specs: list[SAESpec], cfg: TrainConfig):
    state = json.loads((ckpt / "state.json").read_text())
    tensors = load_file(ckpt / "state.safetensors")
    norms = {
        (layer, site): Norm(tensors[f"mean.{layer}.{site}"], c, tensors.get(f"dims.{layer}.{site}"))
        for layer, site, c in state["scales"]
    }
    missing = [s.name for s in specs if s.name not in state["runs"]]
    if missing:
        raise ValueError(
            f"{ckpt}: the checkpoint has no state for {missing}; resume with the same sweep"
        )
    runs = []
    for s in specs:
        info = state["runs"][s.name]
        i = info["index"]
        d_in = tensors[f"{i}.params.W_enc"].shape[0]
        run = _new_run(s, d_in, cfg, i)
        with torch.no_grad():
            for n, q in run.params.named_parameters():
                q.copy_(tensors[f"{i}.params.{n}"])
        run.adam_v = {
            k.split(".", 2)[2]: v.clone() for k, v in tensors.items() if k.startswith(f"{i}.adam.")
        }
        run.last_fired = tensors[f"{i}.last_fired"].clone()
        run.batchtopk_threshold = info["batchtopk_threshold"]
        runs.append(run)
    return state["step"], norms, runs


def tensor_batches(
    data: dict[SiteKey, Tensor], batch_size: int, *, seed: int = 0, epochs: int | None = None
) -> Batches:
    """`Batches` over activations held in memory, reshuffled each epoch (tests, small runs, benches)."""
    n = next(iter(data.values())).shape[0]
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"only {n} activation vectors, fewer than one batch of {batch_size}")

    def batches(start: int) -> Iterator[dict[SiteKey, Tensor]]:
        for i in itertools.count(start):
            epoch, j = divmod(i, per_epoch)
            if epochs is not None and epoch >= epochs:
                return
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
            idx = perm[j * batch_size : (j + 1) * batch_size]
            yield {k: v[idx] for k, v in data.items()}

    return batches


def expand_sweep(
    layers: Iterable[int],
    sites: Iterable[str],
    widths: Iterable[int],
    *,
    architecture: str = "jumprelu",
    l0_coefficients: Iterable[float] = (),
    target_l0s: Iterable[float] = (),
    ks: Iterable[int] = (),
    target_site: str | None = None,
    aux_k: int = 0,
) -> list[SAESpec]:
    """The grid sites x layers x widths x sparsities as specs."""
    sparsities = (
        [{"l0_coefficient": c} for c in l0_coefficients]
        + [{"target_l0": t} for t in target_l0s]
        + [{"k": k} for k in ks]
    )
    if not sparsities:
        raise ValueError("give at least one sparsity: l0 coefficients, target L0s or k values")
    return [
        SAESpec(
            layer=layer,
            site=site,
            width=w,
            architecture=architecture,
            target_site=target_site,
            aux_k=aux_k,
            **sp,
        )
        for site in sites
        for layer in layers
        for w in widths
        for sp in sparsities
    ]


def parse_width(text: str | int) -> int:
    """`16k` -> 16384, `1m` -> 2**20 (Gemma Scope's naming), or a plain integer."""
    if isinstance(text, int):
        return text
    t = str(text).strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ValueError(f"cannot read width {text!r}; write e.g. 4096, 16k or 1m") from None


def load_sweep(path: str | Path) -> tuple[list[SAESpec], dict, dict]:
    """Read a sweep file (YAML or TOML): `saes` and/or a `sweep` grid, `train` options, and `source`.

    Returns `(specs, train_options, source_options)`; see docs/train.md for the layout.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no sweep file at {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    unknown = sorted(set(data) - {"saes", "sweep", "train", "source"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; expected saes, sweep, train, source")
    specs = []
    for i, s in enumerate(data.get("saes", [])):
        try:
            specs.append(SAESpec(**{**s, "width": parse_width(s.get("width", 0))}))
        except TypeError as e:
            raise ValueError(f"{path}: saes[{i}]: {e}") from None
    if "sweep" in data:
        g = dict(data["sweep"])
        try:
            specs += expand_sweep(
                g.pop("layers"), g.pop("sites"), [parse_width(w) for w in g.pop("widths")], **g
            )
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: sweep needs layers, sites, widths and a sparsity list ({e})"
            ) from None
    if not specs:
        raise ValueError(f"{path}: no SAEs; add a `saes` list or a `sweep` grid")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(data.get("train", {})) - fields)
    if bad:
        raise ValueError(f"{path}: unknown train options {bad}; valid: {sorted(fields)}")
    return specs, dict(data.get("train", {})), dict(data.get("source", {}))
