"""The state of each SAE while it trains: parameters, Adam, input normalisation, placement on the
ranks, checkpoints, and the export that folds the normalisation back into the weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from gemmascope.clt import CLT
from gemmascope.common import distributed
from gemmascope.common.distributed import Partition
from gemmascope.common.files import write_json
from gemmascope.models import SiteKey
from gemmascope.sae import SAE, SAEConfig
from gemmascope.train.config import SAESpec, TrainConfig
from gemmascope.train.cross_layer import CLTParams
from gemmascope.train.objectives import Objective, Params
from gemmascope.train.optim import adam_step


@dataclass
class Run:
    """The training state of one SAE."""

    spec: SAESpec
    params: Params | CLTParams
    objective: Objective
    adam_v: dict[str, Tensor]
    last_fired: Tensor  # (m,) token count when each latent last fired
    batchtopk_threshold: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)
    adam_last: Tensor | None = None
    """`int64 [m]` for an SAE or transcoder (None for a CLT): per latent, how many optimizer steps'
    decays its rows of W_enc's and W_dec's Adam second moment `v` hold. `adam_last[j] == n` means
    those rows are exact through step `n - 1` (0-based), i.e. as the dense optimizer leaves them after
    `n` steps; before step `step` reads or updates them they must be decayed by
    `beta2 ** (step - n)`, and once step `step` has updated them, `n = step + 1`. Zero for a new run;
    a checkpoint saved before it existed loads with its step count (its state was fully up to date).
    Placed, gathered and checkpointed like `last_fired`."""


def adam_update(run: Run, lr: float, cfg: TrainConfig, step: int) -> None:
    """Adam with beta1 = 0 by default (Gemma Scope); decoder rows stay unit-norm (see `optim`)."""
    for name, q in run.params.named_parameters():
        kind = name.split(".")[0]  # a CLT's are per layer: `W_dec.3`
        if cfg.beta1 > 0 and f"{name}.m" not in run.adam_v:
            run.adam_v[f"{name}.m"] = torch.zeros_like(q)
        m = run.adam_v.get(f"{name}.m") if cfg.beta1 > 0 else None
        rate = lr * cfg.threshold_lr if kind == "threshold" else lr
        scale = run.params.step_scale(name) if isinstance(run.params, CLTParams) else None
        adam_step(q, run.adam_v[name], m, lr=rate, beta1=cfg.beta1, beta2=cfg.beta2, step=step,
                  unit_rows=kind == "W_dec", col_scale=scale)  # fmt: skip
        if kind == "threshold":
            q.data.clamp_(min=0.0)


def new_run(spec: SAESpec, d_in: int, cfg: TrainConfig, index: int) -> Run:
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    args = (d_in, spec.width, cfg.threshold_init, gen, cfg.encoder_init_scale, spec.skip_connection)
    params = Params(*args) if spec.n_layers is None else CLTParams(spec.n_layers, *args)
    objective = Objective(
        architecture=spec.architecture,
        target_l0=spec.target_l0,
        k=spec.k,
        bandwidth=cfg.bandwidth,
        aux_k=spec.aux_k,
        max_density=cfg.max_density,
        matmul_dtype=getattr(torch, cfg.matmul_dtype),
        prefixes=tuple(spec.matryoshka),
        frequency_coefficient=cfg.frequency_penalty if spec.n_layers is None else 0.0,
        max_frequency=max(cfg.max_frequency, 4 * (spec.target_l0 or 0) / spec.width),
    )
    adam_v = {n: torch.zeros_like(q) for n, q in params.named_parameters()}
    fired = torch.zeros(spec.width * (spec.n_layers or 1), dtype=torch.int64)
    last = torch.zeros(spec.width, dtype=torch.int64) if spec.n_layers is None else None
    return Run(spec, params, objective, adam_v, fired, adam_last=last)


def release_optimizer(run: Run) -> None:
    """Drop the run's Adam state (`adam_v`, `adam_last`): it cannot take another step after this.
    `export` does it; calling it before `unplace` also spares gathering the state."""
    run.adam_v = {}
    run.adam_last = None


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


def partition_of(cfg: TrainConfig, specs: list[SAESpec]) -> Partition:
    """How this run's steps are shared among the ranks (none without torchrun)."""
    world = distributed.world_size()
    if world == 1:
        return Partition()
    if cfg.parallel == "data":
        return Partition(rows=True)
    for s in specs:
        if s.n_layers is not None:
            raise ValueError(f"{s.name}: a CLT's latents stay on one rank; use `parallel` data")
        if s.matryoshka:
            raise ValueError(
                f"{s.name}: Matryoshka prefixes need every latent on one rank; use `parallel` data"
            )
        if s.k and s.width // world < s.k:
            raise ValueError(
                f"{s.name}: {world} ranks leave {s.width // world} latents each, fewer than k; "
                "use fewer ranks or `parallel` data"
            )
    return Partition(latents=True)


# Which dimension of each parameter indexes latents; b_dec has none: every rank holds all of it.
_LATENT_DIM = {
    "W_enc": 1, "W_dec": 0, "b_enc": 0, "threshold": 0, "last_fired": 0, "adam_last": 0,
}  # fmt: skip


def place(run: Run, split: Partition, device: torch.device) -> None:
    """Move a full-width run to `device`, keeping only this rank's latents when they are split."""
    lo, hi = distributed.shard_range(run.spec.width) if split.latents else (0, run.spec.width)

    def take(name: str, t: Tensor) -> Tensor:
        dim = _LATENT_DIM.get(name.split(".")[0])
        if dim is not None and split.latents:
            t = t.narrow(dim, lo, hi - lo)
        if name.startswith("W_enc"):  # one latent per row of memory, as its gradient is made
            return t.T.contiguous().T.to(device)
        return t.contiguous().to(device)

    with torch.no_grad():
        for n, q in run.params.named_parameters():
            q.data = take(n, q.data)
    run.adam_v = {n: take(n, v) for n, v in run.adam_v.items()}
    run.last_fired = take("last_fired", run.last_fired)
    if run.adam_last is not None:
        run.adam_last = take("adam_last", run.adam_last)


def full_state(run: Run, split: Partition) -> dict[str, Tensor]:
    """Parameters, Adam state and counters at full width on the CPU, on rank 0 (empty elsewhere).

    Every rank must call it: with latents split, rank 0 gathers the slices one tensor at a time.
    Tensors already whole on the CPU are the run's own, not copies; each is contiguous or, as W_enc
    and its Adam state are kept, the transpose of a contiguous array (see `_compact`).
    """
    state = {f"params.{n}": q.detach() for n, q in run.params.named_parameters()}
    state.update({f"adam.{n}": v for n, v in run.adam_v.items()})
    state["last_fired"] = run.last_fired
    if run.adam_last is not None:
        state["adam_last"] = run.adam_last
    full = {}
    for key, t in state.items():
        dim = _LATENT_DIM.get(key.split(".")[-2] if key.endswith(".m") else key.split(".")[-1])
        if split.latents and dim is not None:
            t = distributed.gather_cat(t.contiguous(), dim)
        if t is not None:
            full[key] = _compact(t.cpu())
    return full if distributed.is_main() else {}


def _compact(t: Tensor) -> Tensor:
    """`t` itself if it or (2-D) its transpose is contiguous, else a contiguous copy."""
    if t.is_contiguous() or (t.dim() == 2 and t.T.is_contiguous()):
        return t
    return t.contiguous()


def unplace(run: Run, split: Partition) -> None:
    """Bring a run back to the CPU at full width on rank 0 (for export)."""
    state = full_state(run, split)
    if not state:
        return
    with torch.no_grad():
        for n, q in run.params.named_parameters():
            q.data = state[f"params.{n}"]
    run.adam_v = {k[len("adam.") :]: v for k, v in state.items() if k.startswith("adam.")}
    run.last_fired = state["last_fired"]
    run.adam_last = state.get("adam_last")


def export(run: Run, norms: dict[SiteKey, Norm], cfg: TrainConfig) -> SAE | CLT:
    """Fold the input normalisation into the weights so the SAE takes raw activations (encodings
    unchanged): with s = C * dims, pre = ((x - mu) / s) W + b = x (W / s) + (b - (mu / s) W); the
    outputs are scaled back to the target site's units.

    The run's last use: its Adam state is dropped first (`release_optimizer`) and, for an SAE or
    transcoder, the normalisation is folded into its parameters in place and the SAE takes those
    tensors as its weights, so no full-size copy is made. The run cannot train, be checkpointed or
    be exported again afterwards."""
    spec, p = run.spec, run.params
    release_optimizer(run)
    if isinstance(p, CLTParams):
        return _export_clt(run, norms, cfg)
    (mu_in, c_in), (mu_out, c_out) = (
        (norms[k].mean, norms[k].divisor()) for k in (spec.source, spec.target)
    )
    sae_cfg = _exported_config(run, norms, cfg, p.W_enc.shape[0])
    with torch.no_grad():
        shift = mu_in / c_in
        # The biases read W_enc and W_skip as trained, so they are folded before those are scaled.
        p.b_enc.sub_(shift @ p.W_enc)
        p.b_dec.mul_(c_out).add_(mu_out)
        if p.W_skip is not None:
            # y_n += x_n W_skip with x_n = (x - mu_in) / c_in, y = mu_out + c_out y_n
            p.b_dec.sub_((shift @ p.W_skip) * c_out)
            p.W_skip.div_(c_in[:, None]).mul_(c_out)
        p.W_enc.div_(c_in[:, None])
        p.W_dec.mul_(c_out)
        if spec.architecture == "batchtopk":
            p.threshold.fill_(run.batchtopk_threshold)
    names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold", "W_skip")
    arrays = {n: getattr(p, n).detach() for n in names if getattr(p, n) is not None}
    return SAE.from_arrays(sae_cfg, arrays, source=spec.name, adopt=True).eval()


def _exported_config(
    run: Run, norms: dict[SiteKey, Norm], cfg: TrainConfig, d_in: int
) -> SAEConfig:
    spec = run.spec
    return SAEConfig(
        architecture=spec.architecture,
        d_in=d_in,
        d_sae=spec.width,
        k=spec.k,
        model=cfg.model,
        layer=spec.layer,
        site=spec.site,
        target_site=spec.target_site,
        skip_connection=spec.skip_connection,
        n_layers=spec.n_layers,
        dataset=cfg.dataset,
        context_size=cfg.context_size,
        tokens_trained=cfg.steps * cfg.batch_size,
        extra={
            "trainer": "gemmascope",
            "spec": dataclasses.asdict(spec),
            "train_config": dataclasses.asdict(cfg),
            "input_scale_folded": norms[spec.source].scale,
            **({"target_scale_folded": norms[spec.target].scale} if spec.target_site else {}),
        },
    )


def _export_clt(run: Run, norms: dict[SiteKey, Norm], cfg: TrainConfig) -> CLT:
    """`export` for a CLT: each layer's encoder folds its input's normalisation, each decoder row
    block its target layer's, as one-layer transcoders do."""
    spec, p = run.spec, run.params
    L, d = p.n_layers, p.b_dec.shape[1]
    ins = [norms[(layer, spec.site)] for layer in spec.layers]
    outs = [norms[(layer, spec.target_site)] for layer in spec.layers]  # type: ignore[index]
    c_out = torch.stack([n.divisor() for n in outs])  # (L, d)
    mu_out = torch.stack([n.mean for n in outs])
    with torch.no_grad():
        arrays: dict[str, Tensor] = {"b_dec": p.b_dec * c_out + mu_out}
        enc, b_enc, skip = [], [], []
        for i, n in enumerate(ins):
            c_in, mu_in = n.divisor(), n.mean
            enc.append(p.W_enc[i] / c_in[:, None])
            b_enc.append(p.b_enc[i] - (mu_in / c_in) @ p.W_enc[i])
            arrays[f"W_dec_{i}"] = p.W_dec[i].view(-1, L - i, d) * c_out[i:]
            if p.W_skip is not None:
                skip.append(p.W_skip[i] / c_in[:, None] * c_out[i])
                arrays["b_dec"][i] -= ((mu_in / c_in) @ p.W_skip[i]) * c_out[i]
        arrays.update(W_enc=torch.stack(enc), b_enc=torch.stack(b_enc),
                      threshold=torch.stack([t.detach() for t in p.threshold]))  # fmt: skip
        if skip:
            arrays["W_skip"] = torch.stack(skip)
    sae_cfg = _exported_config(run, norms, cfg, d)
    return CLT.from_arrays(sae_cfg, arrays, source=spec.name).eval()


def write_run_config(out: Path, specs: list[SAESpec], cfg: TrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "train_config.json",
        {"train": dataclasses.asdict(cfg), "saes": [dataclasses.asdict(s) for s in specs]},
    )
