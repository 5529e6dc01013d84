"""Our JumpReLU trainer vs SAELens' on the same real activations, side by side in one process.

Gemma 3 270M, layer 6 resid_post (d_in 640), width 16,384, batch 4,096, float32, the same
hyper-parameters for both (Adam betas (0, 0.999), bandwidth 0.001, threshold init 0.001, the same
lambda and warm-ups). Inputs are pre-scaled so that E||x||^2 = 1 for both trainers.

Prints, per trainer: tokens/s over the whole run (it starts dense: at init about half the latents fire),
tokens/s in the sparse regime (L0 ~ 50, where our kernels pay off and SAELens' cost is unchanged), the FVU
and L0 reached on held-out activations after the same number of tokens, and the ratio of our speed to
the machine's limit for the one dense product (2 * d_in * width flops per token at the sgemm rate
measured here).

    python bench/train.py [--activations CACHE_DIR] [--steps 30] [--width 16384]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gemmascope.objectives import forward_backward
from gemmascope.train import SAESpec, TrainConfig, _adam, _new_run


def activations(cache: Path | None, tokens: int) -> torch.Tensor:
    from gemmascope.activations import CacheConfig, build_cache
    from gemmascope.loader import CachedActivations
    from gemmascope.models import cache_dir

    path = cache or cache_dir() / "bench" / "gemma-3-270m-l6-resid_post"
    if not (path / "manifest.json").exists():
        build_cache(CacheConfig(out=path, layers="6", sites=["resid_post"], tokens=tokens))
    data = CachedActivations(path, (6, "resid_post"), batch_size=4096, epochs=1, partial=True)
    return torch.cat([b[(6, "resid_post")] for b in data.batches()])


def sgemm_rate(d: int, m: int, batch: int) -> float:
    x, w = torch.randn(batch, d), torch.randn(d, m)
    x @ w
    t = time.perf_counter()
    for _ in range(3):
        x @ w
    return 3 * 2 * batch * d * m / (time.perf_counter() - t)


def held_out_metrics(encode, decode, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        z = encode(x)
        x_hat = decode(z)
    fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return fvu, float((z != 0).sum(-1).float().mean())


def ours(train_x, test_x, args, lam) -> dict:
    cfg = TrainConfig(
        tokens=args.steps * args.batch, batch_size=args.batch, lr=args.lr, lr_warmup_steps=args.warmup,
        l0_warmup_steps=args.warmup, matmul_dtype=args.matmul_dtype, log_every=10**9,
    )  # fmt: skip
    spec = SAESpec(6, "resid_post", args.width, "jumprelu", l0_coefficient=lam)
    run = _new_run(spec, train_x.shape[1], cfg, 0)
    p = run.params
    t = time.perf_counter()
    for step in range(args.steps):
        x = train_x[(step * args.batch) % len(train_x) :][: args.batch]
        run.objective.coefficient = cfg.coefficient_at(step, lam)
        forward_backward(p, x, x, run.objective)
        _adam(run, cfg.lr_at(step), cfg, step)
    whole = args.steps * args.batch / (time.perf_counter() - t)
    fvu, l0 = held_out_metrics(
        lambda x: (lambda pre: pre * (pre > p.threshold))(x @ p.W_enc + p.b_enc),
        lambda z: z @ p.W_dec + p.b_dec,
        test_x,
    )
    # Sparse regime: thresholds at each latent's quantile so that L0 is about 50 on this data.
    with torch.no_grad():
        pre = train_x[: args.batch] @ p.W_enc + p.b_enc
        q = 1 - 50 / args.width
        p.threshold.copy_(pre.quantile(q, dim=0).clamp_min(1e-4))
    n = max(3, args.steps // 5)
    t = time.perf_counter()
    for step in range(n):
        x = train_x[(step * args.batch) % len(train_x) :][: args.batch]
        stats = forward_backward(p, x, x, run.objective)
        _adam(run, cfg.lr, cfg, args.steps + step)
    sparse = n * args.batch / (time.perf_counter() - t)
    return {"whole": whole, "sparse": sparse, "fvu": fvu, "l0": l0, "sparse_l0": stats.l0}


def saelens(train_x, test_x, args, lam) -> dict:
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = JumpReLUTrainingSAEConfig(
        d_in=train_x.shape[1], d_sae=args.width, dtype="float32", device="cpu",
        jumprelu_init_threshold=0.001, jumprelu_bandwidth=0.001, l0_coefficient=lam,
        l0_warm_up_steps=args.warmup, normalize_activations="none",
    )  # fmt: skip
    sae = JumpReLUTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch, lr=args.lr,
        lr_warm_up_steps=args.warmup, lr_end=args.lr, adam_beta1=0.0, adam_beta2=0.999, n_batches_for_norm_estimate=1,
    )  # fmt: skip
    batches = (train_x[(s * args.batch) % len(train_x) :][: args.batch] for s in range(10**9))
    trainer = SAETrainer(trainer_cfg, sae, data_provider=batches)
    t = time.perf_counter()
    for _ in range(args.steps):
        trainer.step(next(batches))
        trainer.n_training_steps += 1
    whole = args.steps * args.batch / (time.perf_counter() - t)
    sae.eval()
    fvu, l0 = held_out_metrics(sae.encode, sae.decode, test_x)
    return {"whole": whole, "sparse": whole, "fvu": fvu, "l0": l0}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--activations", type=Path, help="a gemmascope cache of layer 6 resid_post")
    ap.add_argument(
        "--tokens", type=int, default=300_000, help="tokens to cache when none is given"
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lambda", dest="lam", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    acts = activations(args.activations, args.tokens).float()
    acts /= acts.pow(2).sum(-1).mean().sqrt()  # E||x||^2 = 1 for both trainers
    test_x, train_x = acts[:8192], acts[8192:]
    rate = sgemm_rate(acts.shape[1], args.width, args.batch)
    limit = rate / (2 * acts.shape[1] * args.width)
    print(f"{len(train_x):,} training vectors, d_in {acts.shape[1]}, width {args.width}, batch {args.batch}, "
          f"{args.steps} steps, {torch.get_num_threads()} threads; sgemm {rate / 1e9:.0f} GFLOP/s "
          f"-> encoder-only limit {limit:,.0f} tok/s")  # fmt: skip
    a = ours(train_x, test_x, args, args.lam)
    b = saelens(train_x, test_x, args, args.lam)
    print(f"{'trainer':<10} {'tok/s whole':>12} {'tok/s @L0~50':>13} {'FVU':>7} {'L0':>8}")
    for name, r in (("gemmascope", a), ("SAELens", b)):
        print(
            f"{name:<10} {r['whole']:>12,.0f} {r['sparse']:>13,.0f} {r['fvu']:>7.3f} {r['l0']:>8.1f}"
        )
    print(f"ratio whole run: {a['whole'] / b['whole']:.2f}x; sparse regime (L0 {a['sparse_l0']:.0f}): "
          f"{a['sparse'] / b['sparse']:.2f}x; ours / encoder-only limit: {a['sparse'] / limit:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
