"""Training speed of our JumpReLU trainer on one device: tokens/s per width and dtype.

Synthetic activations (nothing is downloaded, no model is needed): Gaussian noise plus sparse sums
of fixed random directions, d_in 640 like Gemma 3 270M, seed 0, a pool of batches held on the device.
Each configuration runs the trainer's own step (`train._train_step`: the encoder and decoder
products, the straight-through estimators, Adam, the decoder-norm projection) for a few warm-up steps,
then for about `--seconds` or `--steps` steps, and reports tokens/s, the dense FLOP rate that implies
(10 * d_in * width per token on the torch path: 2 forward products, 3 backward), L0 and peak memory.

    python bench/train_device.py --device cuda                       # widths 16k, 131k; fp32, bf16
    python bench/train_device.py --device cpu --widths 1024 --steps 3
"""

from __future__ import annotations

import argparse
import time

import torch

from gemmascope.common import devices, distributed
from gemmascope.train import Norm, SAESpec, TrainConfig
from gemmascope.train.loop import _train_step
from gemmascope.train.state import new_run, place

SITE = (0, "resid_post")


def synthetic(n: int, d: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """`n` activation vectors `[n, d]`: noise plus ~32 of 4096 unit directions, with a fixed seed."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dirs = torch.randn(4096, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    out = torch.empty(n, d)
    for lo in range(0, n, 4096):  # chunks keep the mask small
        hi = min(n, lo + 4096)
        mask = torch.rand(hi - lo, 4096, generator=g) < 32 / 4096
        z = mask * torch.rand(hi - lo, 4096, generator=g)
        out[lo:hi] = z @ dirs + 0.3 * torch.randn(hi - lo, d, generator=g)
    out /= out.pow(2).sum(-1).mean().sqrt()  # E||x||^2 = 1, as the trainer's input scaling gives
    return out.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def bench(width: int, dtype: str, pool: torch.Tensor, args: argparse.Namespace) -> dict:
    device = pool.device
    steps_total = args.warmup + args.steps
    cfg = TrainConfig(tokens=steps_total * args.batch, batch_size=args.batch, lr=2e-3,
                      lr_warmup_steps=2, l0_warmup_steps=2, matmul_dtype=dtype,  # type: ignore[arg-type]
                      device=str(device))  # fmt: skip
    spec = SAESpec(*SITE, width, "jumprelu", l0_coefficient=3e-3)
    run = new_run(spec, pool.shape[1], cfg, 0)
    place(run, distributed.Split(), device)
    n_batches = pool.shape[0] // args.batch
    norms = {SITE: Norm(torch.zeros(pool.shape[1], device=device), 1.0)}  # pool is pre-scaled
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(i: int):
        lo = (i % n_batches) * args.batch
        batch = {SITE: pool[lo : lo + args.batch]}
        return _train_step(run, batch, norms, cfg, i, cfg.lr_at(i))

    for i in range(args.warmup):
        step(i)
    sync(device)
    t0, done = time.perf_counter(), 0
    while done < args.steps and (done < 3 or time.perf_counter() - t0 < args.seconds):
        stats = step(args.warmup + done)
        done += 1
    sync(device)
    seconds = time.perf_counter() - t0
    tok_s = done * args.batch / seconds
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    )
    return {"width": width, "dtype": dtype, "steps": done, "tok_s": tok_s,
            "tflops": 10 * pool.shape[1] * width * tok_s / 1e12, "l0": stats.l0, "peak_gib": peak}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="auto", help=devices.DEVICE_HELP)
    ap.add_argument("--widths", default="16384,131072")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--d-in", type=int, default=640)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (kernels, caches)")
    ap.add_argument("--steps", type=int, default=500, help="at most this many timed steps")
    ap.add_argument("--seconds", type=float, default=15.0, help="stop timing after about this")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = devices.resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    pool = synthetic(args.batch * 8, args.d_in, device)
    print(f"device {device} ({name}), torch {torch.__version__}, d_in {args.d_in}, "
          f"batch {args.batch}, synthetic activations (seed 0)")  # fmt: skip
    print(
        f"{'width':>8} {'dtype':>9} {'steps':>6} {'tok/s':>12} {'TFLOP/s':>8} {'L0':>8} {'peak GiB':>9}"
    )
    for width in (int(w) for w in args.widths.split(",")):
        for dtype in args.dtypes.split(","):
            r = bench(width, dtype, pool, args)
            print(f"{r['width']:>8} {r['dtype']:>9} {r['steps']:>6} {r['tok_s']:>12,.0f} "
                  f"{r['tflops']:>8.1f} {r['l0']:>8.1f} {r['peak_gib']:>9.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
