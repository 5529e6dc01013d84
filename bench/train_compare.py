"""One speed table for the SAE trainers people use, side by side on the same cached activations.

Every trainer sees the same batches of the same real activations (Gemma 3 270M layer 6 `resid_post`,
pre-scaled to E||x||^2 = 1), the same width, batch size and number of tokens, in float32 on the CPU,
in this one process. Each runs its own training step:

- gemmascope: `gemmascope.train.train` (JumpReLU with an L0 penalty lambda; TopK), with its short-run
  options `encoder_init_scale=0.1, center=True` (sparsify, likewise, starts b_dec at the data mean);
- SAELens: `SAETrainer.step` on `JumpReLUTrainingSAE` (the same lambda) and `TopKTrainingSAE`;
- sparsify (`eai-sparsify`): its `Trainer` only trains from a live model's forward hooks, so the
  bench runs the body of its step on the batches: `SparseCoder` forward (fused TopK encoder), FVU
  loss, `remove_gradient_parallel_to_decoder_directions`, its default optimizer (SignSGD in
  ScheduleFree, its default lr), unit-norm decoder, b_dec initialised to the first batch's mean;
- dictionary_learning: `TopKTrainer.update` and `JumpReluTrainer.update` (its JumpReLU has only a
  target-L0 penalty: target 50). Skipped with a note when not importable: it pins nnsight<0.4, whose
  dependencies replace torch, so install it with `pip install --no-deps dictionary-learning==0.1.0
  nnsight==0.3.7` plus `python-socketio zstandard`.

Adam-based trainers get the same lr; warm-ups are shortened alike. Printed per trainer: tokens/s over
the whole run, FVU and L0 on 8,192 held-out activations, and ours / theirs in tokens/s.

    python bench/train_compare.py [--activations CACHE_DIR] [--width 4096] [--steps 30]
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from train import activations, held_out_metrics  # bench/ is on sys.path when a bench script runs

Result = dict[str, float]
KEY = (6, "resid_post")


def slices(x: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    """The same batch sequence for every trainer: consecutive slices, wrapping around."""
    for s in itertools.count():
        yield x[(s * batch) % (len(x) - batch + 1) :][:batch]


def timed(
    steps: int, batch: int, step: Callable[[int, torch.Tensor], object], x: torch.Tensor
) -> float:
    """Tokens/s of `step(i, batch_i)` over `steps` batches."""
    batches = slices(x, batch)
    start = time.perf_counter()
    for i in range(steps):
        step(i, next(batches))
    return steps * batch / (time.perf_counter() - start)


def ours(arch: str, train_x, test_x, args) -> Result:
    from gemmascope.train import SAESpec, TrainConfig, train

    spec = SAESpec(*KEY, args.width, arch, **(
        {"l0_coefficient": args.lam} if arch == "jumprelu" else {"k": args.k}))  # fmt: skip
    cfg = TrainConfig(tokens=args.steps * args.batch, batch_size=args.batch, lr=args.lr,
                      lr_warmup_steps=args.warmup, l0_warmup_steps=args.warmup,
                      encoder_init_scale=0.1, center=True,  # the options of bench/RESULTS.md's run,
                      threshold_lr=1.0, frequency_penalty=0.0,  # from before today's defaults
                      log_every=10**9, checkpoint_every=10**9)  # fmt: skip

    def batches(start: int) -> Iterator[dict]:
        return ({KEY: b} for b in itertools.islice(slices(train_x, args.batch), start, None))

    with tempfile.TemporaryDirectory(prefix="gemmascope-bench-") as tmp:
        start = time.perf_counter()
        sae = next(iter(train([spec], batches, cfg, tmp, progress=False).values()))
        tok_s = args.steps * args.batch / (time.perf_counter() - start)
    return {"tok_s": tok_s, **metrics(sae.eval().encode, sae.decode, test_x)}


def saelens(arch: str, train_x, test_x, args) -> Result:
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    common = {"d_in": train_x.shape[1], "d_sae": args.width, "dtype": "float32", "device": "cpu"}
    if arch == "jumprelu":
        sae = sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(
            **common, jumprelu_init_threshold=0.001, jumprelu_bandwidth=0.001,
            l0_coefficient=args.lam, l0_warm_up_steps=args.warmup))  # fmt: skip
    else:
        sae = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(**common, k=args.k))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch,
        lr=args.lr, lr_warm_up_steps=args.warmup, lr_end=args.lr, n_batches_for_norm_estimate=1,
    )  # fmt: skip
    trainer = SAETrainer(trainer_cfg, sae, data_provider=slices(train_x, args.batch))

    def step(_: int, x: torch.Tensor) -> None:
        trainer.step(x)
        trainer.n_training_steps += 1

    tok_s = timed(args.steps, args.batch, step, train_x)
    sae.eval()
    return {"tok_s": tok_s, **metrics(sae.encode, sae.decode, test_x)}


def sparsify(train_x, test_x, args) -> Result:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(train_x.shape[1], SparseCoderConfig(k=args.k, num_latents=args.width),
                      dtype=torch.float32)  # fmt: skip
    lr = 5e-3 / (args.width / 2**14) ** 0.5  # sparsify's default for its default optimizer
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()

    def step(i: int, x: torch.Tensor) -> None:
        if i == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    tok_s = timed(args.steps, args.batch, step, train_x)
    opt.eval()  # ScheduleFree: evaluate the averaged weights, as sparsify does when it saves

    def encode(x: torch.Tensor) -> torch.Tensor:
        acts, idx, _ = sae.encode(x)
        return torch.zeros(len(x), args.width).scatter_(-1, idx, acts)

    return {"tok_s": tok_s, **metrics(encode, lambda z: z @ sae.W_dec + sae.b_dec, test_x)}


def dictionary_learning(arch: str, train_x, test_x, args) -> Result:
    from dictionary_learning.trainers import JumpReluTrainer, TopKTrainer

    common = {"steps": args.steps, "activation_dim": train_x.shape[1], "dict_size": args.width,
              "layer": KEY[0], "lm_name": "gemma-3-270m", "lr": args.lr, "device": "cpu",
              "warmup_steps": args.warmup}  # fmt: skip
    if arch == "jumprelu":
        trainer = JumpReluTrainer(**common, target_l0=50.0, sparsity_warmup_steps=args.warmup)
    else:
        trainer = TopKTrainer(**common, k=args.k, threshold_start_step=args.steps)
    tok_s = timed(args.steps, args.batch, trainer.update, train_x)
    return {"tok_s": tok_s, **metrics(trainer.ae.encode, trainer.ae.decode, test_x)}


def metrics(encode, decode, x: torch.Tensor) -> Result:
    fvu, l0 = held_out_metrics(encode, decode, x)
    return {"fvu": fvu, "l0": l0}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--activations", type=Path, help="a gemmascope cache of layer 6 resid_post")
    ap.add_argument(
        "--tokens", type=int, default=300_000, help="tokens to cache when none is given"
    )
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lambda", dest="lam", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    acts = activations(args.activations, args.tokens).float()
    acts /= acts.pow(2).sum(-1).mean().sqrt()  # E||x||^2 = 1 for every trainer
    test_x, train_x = acts[:8192], acts[8192 : 8192 + args.steps * args.batch]
    print(f"{len(train_x):,} training vectors, d_in {acts.shape[1]}, width {args.width}, batch "
          f"{args.batch}, {args.steps} steps, k {args.k}, lambda {args.lam}, lr {args.lr}, "
          f"{torch.get_num_threads()} threads, float32")  # fmt: skip
    runs: list[tuple[str, str, Callable[[], Result]]] = [
        ("gemmascope", "jumprelu", lambda: ours("jumprelu", train_x, test_x, args)),
        ("gemmascope", "topk", lambda: ours("topk", train_x, test_x, args)),
        ("SAELens", "jumprelu", lambda: saelens("jumprelu", train_x, test_x, args)),
        ("SAELens", "topk", lambda: saelens("topk", train_x, test_x, args)),
        ("sparsify", "topk", lambda: sparsify(train_x, test_x, args)),
        ("dictionary_learning", "jumprelu", lambda: dictionary_learning("jumprelu", train_x, test_x, args)),
        ("dictionary_learning", "topk", lambda: dictionary_learning("topk", train_x, test_x, args)),
    ]  # fmt: skip
    results: dict[tuple[str, str], Result] = {}
    print(f"| {'tool':<19} | {'arch':<8} | {'tok/s':>7} | {'FVU':>6} | {'L0':>7} | ours / it |")
    print(f"|{'-' * 21}|{'-' * 10}|{'-' * 9}|{'-' * 8}|{'-' * 9}|-----------|")
    for tool, arch, run in runs:
        try:
            r = results[tool, arch] = run()
        except ImportError as e:
            print(f"| {tool:<19} | {arch:<8} | not installed ({e.name}) |")
            continue
        ratio = results["gemmascope", arch]["tok_s"] / r["tok_s"]
        fvu = f"{r['fvu']:.3f}" if math.isfinite(r["fvu"]) else "nan"
        print(f"| {tool:<19} | {arch:<8} | {r['tok_s']:>7,.0f} | {fvu:>6} | {r['l0']:>7.1f} | "
              f"{ratio:>8.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
