"""Our JumpReLU trainer vs SAELens' on the same real activations, side by side in one process.

Gemma 3 270M, layer 6 resid_post (d_in 640), width 16,384, batch 4,096, float32, the same
hyper-parameters for both (Adam betas (0, 0.999), bandwidth 0.001, threshold init 0.001, the same
lambda, lr and warm-ups). Inputs are pre-scaled so that E||x||^2 = 1 for both trainers. Each trainer
keeps its own init and input handling: SAELens' (decoder rows of norm 0.1, W_enc = W_dec^T, b_dec
subtracted from the input) and ours with its two short-run options (unit decoder rows, W_enc =
0.1 * W_dec^T, inputs centred and rescaled by `train.estimate_norms` on the first 8 batches, as
`--center` does; `--encoder-init-scale 1 --no-center` for the paper's exact recipe).

The trainers take turns on the same batch, step by step, so a busy machine slows both alike. Prints, per
trainer: tokens/s over the whole run and over its second half (sparse by then), the FVU and L0 reached
on held-out activations after the same number of tokens, and the ratio of our second-half speed to the
machine's limit for the one dense product (2 * d_in * width flops per token: an encoder-sized matmul
timed in turn with the trainers).

    python bench/train.py [--activations CACHE_DIR] [--steps 40] [--lambda 3e-3] [--width 16384]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gemmascope.train import Norm, SAESpec, TrainConfig, estimate_norms
from gemmascope.train.state import adam_update, new_run
from gemmascope.train.step import forward_backward


def activations(cache: Path | None, tokens: int) -> torch.Tensor:
    from gemmascope.activations import CacheConfig, CachedActivations, build_cache
    from gemmascope.models import cache_dir

    path = cache or cache_dir() / "bench" / "gemma-3-270m-l6-resid_post"
    if not (path / "manifest.json").exists():
        build_cache(CacheConfig(out=path, layers="6", sites=["resid_post"], tokens=tokens))
    data = CachedActivations(path, (6, "resid_post"), batch_size=4096, epochs=1, partial=True)
    return torch.cat([b[(6, "resid_post")] for b in data.batches()])


class EncoderOnly:
    """The machine's limit: one `x @ W_enc` per step (2 * d_in * width flops per token), timed in turn
    with the trainers, so it meets the same load."""

    def __init__(self, d_in: int, width: int) -> None:
        self.w = torch.randn(d_in, width)

    def step(self, step: int, x: torch.Tensor) -> None:
        x @ self.w

    def metrics(self, x: torch.Tensor) -> tuple[float, float]:
        return float("nan"), float("nan")


def held_out_metrics(encode, decode, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        z = encode(x)
        x_hat = decode(z)
    fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return fvu, float((z != 0).sum(-1).float().mean())


class Ours:
    """Our trainer, one step at a time."""

    def __init__(
        self,
        args,
        d_in: int,
        lam: float | None = None,
        target_l0: float | None = None,
        dtype: str = "float32",
        norm: Norm | None = None,
    ) -> None:
        self.cfg = TrainConfig(
            tokens=args.steps * args.batch, batch_size=args.batch, lr=args.lr, lr_warmup_steps=args.warmup,
            l0_warmup_steps=args.warmup, matmul_dtype=dtype, log_every=10**9,
            encoder_init_scale=args.encoder_init_scale,
            threshold_lr=1.0, frequency_penalty=0.0,  # the peers' settings: SAELens has neither
        )  # fmt: skip
        self.lam = (
            lam if target_l0 is None else 1.0
        )  # the target-L0 penalty's weight, as train() sets it
        spec = SAESpec(
            6, "resid_post", args.width, "jumprelu", l0_coefficient=lam, target_l0=target_l0
        )
        self.run = new_run(spec, d_in, self.cfg, 0)
        self.norm = norm or Norm(torch.zeros(d_in), 1.0)

    def step(self, step: int, x: torch.Tensor) -> None:
        self.run.objective.coefficient = self.cfg.coefficient_at(step, self.lam)
        x = self.norm(x)
        forward_backward(self.run.params, x, x, self.run.objective)
        adam_update(self.run, self.cfg.lr_at(step), self.cfg, step)

    def metrics(self, x: torch.Tensor) -> tuple[float, float]:
        p, x = self.run.params, self.norm(x)  # FVU does not change with the folded-back norm
        return held_out_metrics(
            lambda x: (lambda pre: pre * (pre > p.threshold))(x @ p.W_enc + p.b_enc),
            lambda z: z @ p.W_dec + p.b_dec,
            x,
        )


class SAELens:
    """SAELens' JumpReLU trainer, driven through its own `SAETrainer.step`."""

    def __init__(self, args, lam: float, d_in: int) -> None:
        from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        cfg = JumpReLUTrainingSAEConfig(
            d_in=d_in, d_sae=args.width, dtype="float32", device="cpu",
            jumprelu_init_threshold=0.001, jumprelu_bandwidth=0.001, l0_coefficient=lam,
            l0_warm_up_steps=args.warmup, normalize_activations="none",
        )  # fmt: skip
        self.sae = JumpReLUTrainingSAE(cfg)
        trainer_cfg = SAETrainerConfig(
            total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch, lr=args.lr,
            lr_warm_up_steps=args.warmup, lr_end=args.lr, adam_beta1=0.0, adam_beta2=0.999, n_batches_for_norm_estimate=1,
        )  # fmt: skip
        self.trainer = SAETrainer(trainer_cfg, self.sae, data_provider=iter(()))

    def step(self, step: int, x: torch.Tensor) -> None:
        self.trainer.step(x)
        self.trainer.n_training_steps += 1

    def metrics(self, x: torch.Tensor) -> tuple[float, float]:
        self.sae.eval()
        return held_out_metrics(self.sae.encode, self.sae.decode, x)


def race(trainers: dict, train_x: torch.Tensor, test_x: torch.Tensor, args) -> dict[str, dict]:
    """Step every trainer on the same batch in turn, so that load on the machine hits them alike."""
    times = {name: [] for name in trainers}
    for step in range(args.steps):
        x = train_x[(step * args.batch) % len(train_x) :][: args.batch]
        for name, t in trainers.items():
            start = time.perf_counter()
            t.step(step, x)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, t in trainers.items():
        late = times[name][args.steps // 2 :]
        fvu, l0 = t.metrics(test_x)
        out[name] = {"whole": args.steps * args.batch / sum(times[name]),
                     "late": len(late) * args.batch / sum(late), "fvu": fvu, "l0": l0}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--activations", type=Path, help="a gemmascope cache of layer 6 resid_post")
    ap.add_argument(
        "--tokens", type=int, default=300_000, help="tokens to cache when none is given"
    )
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lambda", dest="lam", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--ours", type=lambda v: [float(x) for x in v.split(",")], default=[3e-3, 1e-2],
                    help="lambdas for our trainer (SAELens runs at --lambda)")  # fmt: skip
    ap.add_argument("--matmul-dtype", default="float32",
                    help="ours: encoder matmul dtype(s), float32 and/or bfloat16, comma-separated")  # fmt: skip
    ap.add_argument("--encoder-init-scale", type=float, default=0.1,
                    help="ours: W_enc = scale * W_dec^T at init (the recipe's 1 needs long runs)")  # fmt: skip
    ap.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                    help="ours: centre the inputs as `--center` does (default on)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    acts = activations(args.activations, args.tokens).float()
    acts /= acts.pow(2).sum(-1).mean().sqrt()  # E||x||^2 = 1 for both trainers
    test_x, train_x = acts[:8192], acts[8192:]
    print(f"{len(train_x):,} training vectors, d_in {acts.shape[1]}, width {args.width}, batch {args.batch}, "
          f"{args.steps} steps, {torch.get_num_threads()} threads")  # fmt: skip
    d = acts.shape[1]
    first = [{0: train_x[i * args.batch : (i + 1) * args.batch]} for i in range(8)]
    norm = estimate_norms(first, center=True)[0] if args.center else None
    trainers = {
        f"ours λ={lam:g} {'bf16' if dtype == 'bfloat16' else 'fp32'}": Ours(
            args, d, lam=lam, dtype=dtype, norm=norm
        )
        for lam in args.ours
        for dtype in args.matmul_dtype.split(",")
    }
    trainers["SAELens"] = SAELens(args, args.lam, d)
    trainers["encoder matmul only"] = EncoderOnly(d, args.width)
    r = race(trainers, train_x, test_x, args)
    b, limit = r["SAELens"], r["encoder matmul only"]["late"]
    print(f"{'trainer':<20} {'tok/s whole':>12} {'tok/s 2nd half':>15} {'FVU':>7} {'L0':>8} "
          f"{'x SAELens whole':>16} {'2nd half':>9} {'/ limit':>8}")  # fmt: skip
    for name, v in r.items():
        print(f"{name:<20} {v['whole']:>12,.0f} {v['late']:>15,.0f} {v['fvu']:>7.3f} {v['l0']:>8.1f} "
              f"{v['whole'] / b['whole']:>16.2f} {v['late'] / b['late']:>9.2f} {v['late'] / limit:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
