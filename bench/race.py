"""Quality race: our SAEs against SAELens's at equal tokens and equal L0, judged by held-out ΔLM loss.

At each L0 of a small sweep both train on the same cached activations (Gemma 3 270M layer 6
`resid_post`, width 4,096, batch 1,024, `make demo`'s 800k token-steps by default), in the same
order, in this process; then every SAE is evaluated together on the same held-out tokens. Each
side uses its best settings: ours the default recipe (JumpReLU at a target L0, `TrainConfig()`);
SAELens its BatchTopK (exact L0 by construction, saved as a JumpReLU SAE, its defaults: decoder
rows of norm 0.1, AuxK, b_dec subtracted from the input, Adam (0.9, 0.999)) on inputs scaled to
E||x||^2 = 1, with its learning rate picked from `--saelens-lrs` by held-out ΔLM loss at the
middle L0.

    gemmascope cache --layers 6 --sites resid_post --tokens 200k --out demo-out/cache
    python bench/race.py demo-out/cache
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from gemmascope import io
from gemmascope.activations import CachedActivations
from gemmascope.evaluate import evaluate
from gemmascope.models import load_model
from gemmascope.train import SAESpec, TrainConfig, train


def train_saelens(data, key, width: int, k: int, tokens: int, lr: float, out: Path):
    """SAELens's BatchTopK through its own `SAETrainer.step`, exported as our SAE on raw inputs."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    batch = data.batch_size
    first = torch.cat([b[key] for b in itertools.islice(data.batches(), 8)])
    scale = float(first.pow(2).sum(-1).mean().sqrt())  # E||x / scale||^2 = 1
    cfg = BatchTopKTrainingSAEConfig(d_in=first.shape[-1], d_sae=width, k=k, dtype="float32",
                                     device="cpu")  # fmt: skip
    sae = BatchTopKTrainingSAE(cfg)
    trainer = SAETrainer(
        SAETrainerConfig(total_training_samples=tokens, train_batch_size_samples=batch, lr=lr,
                         lr_end=lr, n_batches_for_norm_estimate=1),
        sae, data_provider=iter(()),
    )  # fmt: skip
    for _, b in zip(range(tokens // batch), data.batches(), strict=False):
        trainer.step(b[key] / scale)
        trainer.n_training_steps += 1
    sae.save_inference_model(out)
    ours = io.load(out)
    ours.cfg.input_scale, ours.cfg.layer, ours.cfg.site = scale, *key
    return ours.fold_input_scale()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", help="a `gemmascope cache` folder holding the site")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--l0s", type=int, nargs="+", default=[20, 50, 100])
    ap.add_argument("--tokens", type=int, default=800_000, help="training tokens per SAE")
    ap.add_argument("--saelens-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    ap.add_argument("--eval-tokens", type=int, default=4096)
    args = ap.parse_args()

    key = (args.layer, args.site)
    data = CachedActivations(args.cache, key, batch_size=1024, seed=0)
    model, tok = load_model(args.model)
    middle = args.l0s[len(args.l0s) // 2]
    saes, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:

        def timed(name, make):
            t0 = time.perf_counter()
            saes[name] = make()
            seconds[name] = time.perf_counter() - t0
            print(f"trained {name} in {seconds[name]:.0f} s", flush=True)

        for l0 in args.l0s:
            spec = SAESpec(args.layer, args.site, args.width, target_l0=float(l0))
            cfg = TrainConfig(tokens=args.tokens, batch_size=1024, seed=0)
            timed(("ours", l0, None), lambda spec=spec, cfg=cfg, l0=l0: train(
                [spec], data.batches, cfg, f"{tmp}/ours{l0}", progress=False)[spec.name])  # fmt: skip
        for lr in args.saelens_lrs:
            timed(("saelens", middle, lr), lambda lr=lr: train_saelens(
                data, key, args.width, middle, args.tokens, lr, Path(tmp) / f"sl{lr}"))  # fmt: skip
        # SAELens's best learning rate at the middle L0 trains the others
        tuned = dict(zip(saes, evaluate(model, tok, list(saes.values()), tokens=args.eval_tokens,
                                        progress=False), strict=True))  # fmt: skip
        best = min(args.saelens_lrs, key=lambda lr: tuned[("saelens", middle, lr)]["delta_lm_loss"])
        for l0 in args.l0s:
            if l0 != middle:
                timed(("saelens", l0, best), lambda l0=l0: train_saelens(
                    data, key, args.width, l0, args.tokens, best, Path(tmp) / f"sl{l0}"))  # fmt: skip
        rest = [name for name in saes if name not in tuned]
        if rest:
            tuned.update(zip(rest, evaluate(model, tok, [saes[n] for n in rest],
                                            tokens=args.eval_tokens, progress=False), strict=True))  # fmt: skip

    first = next(iter(tuned.values()))
    print(f"layer {args.layer} {args.site}, width {args.width}, {args.tokens:,} training tokens, "
          f"{first['tokens']:,} held-out tokens; SAELens lr {best:g} (best of {args.saelens_lrs})")  # fmt: skip
    print(f"{'trainer':8s} {'L0 aim':>6s} {'lr':>7s} {'train s':>7s} {'L0':>6s} {'FVU':>7s} "
          f"{'ΔLM loss':>9s} {'dead':>5s}")  # fmt: skip
    for name in sorted(tuned, key=lambda n: (n[1], n[0], n[2] or 0)):
        r = tuned[name]
        lr = "" if name[2] is None else f"{name[2]:g}"
        print(f"{name[0]:8s} {name[1]:6d} {lr:>7s} {seconds[name]:7.0f} {r['l0']:6.1f} "
              f"{r['fvu']:7.4f} {r['delta_lm_loss']:9.3f} {r['dead']:5d}")  # fmt: skip
    for l0 in args.l0s:
        a, b = tuned[("ours", l0, None)], tuned[("saelens", l0, best)]
        print(f"L0 {l0}: SAELens / ours ΔLM loss {b['delta_lm_loss'] / a['delta_lm_loss']:.2f}, "
              f"FVU {b['fvu'] / a['fvu']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
