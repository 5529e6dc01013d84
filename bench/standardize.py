"""Input normalisation against ΔLM loss: the same SAE trained centred, and standardized per dimension.

Both train on the same cached activations in the same order, in this process, with the short-run
options (`encoder_init_scale` 0.1, lr 2e-3, batch 1,024), then are evaluated together on the same
held-out tokens. `--center` divides by one scale C, so the loss is dominated by the dimensions of
largest variance; `--standardize` divides each dimension by its own standard deviation.

    gemmascope cache --layers 6 --sites resid_post --tokens 200k --out demo-out/cache
    python bench/standardize.py demo-out/cache --layer 6 --site resid_post
"""

from __future__ import annotations

import argparse
import tempfile
import time

from gemmascope.activations import CachedActivations
from gemmascope.evaluate import evaluate
from gemmascope.models import load_model
from gemmascope.train import SAESpec, TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", help="a `gemmascope cache` folder holding the site")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--target-l0", type=float, default=50.0)
    ap.add_argument("--tokens", type=int, default=300_000, help="training tokens per SAE")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    args = ap.parse_args()

    key = (args.layer, args.site)
    data = CachedActivations(args.cache, key, batch_size=1024, seed=0)
    spec = SAESpec(args.layer, args.site, args.width, target_l0=args.target_l0)
    saes, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in (
            ("centred", {"center": True}),
            ("standardized", {"standardize": True}),
        ):
            cfg = TrainConfig(tokens=args.tokens, batch_size=1024, lr=2e-3, encoder_init_scale=0.1,
                              threshold_lr=1.0, frequency_penalty=0.0,  # as in bench/RESULTS.md
                              **options)  # fmt: skip
            t0 = time.perf_counter()
            saes[name] = train([spec], data.batches, cfg, f"{tmp}/{name}", progress=False)[
                spec.name
            ]
            seconds[name] = time.perf_counter() - t0
    model, tok = load_model(args.model)
    records = dict(zip(saes, evaluate(model, tok, list(saes.values()), tokens=args.eval_tokens,
                                      progress=False), strict=True))  # fmt: skip
    print(f"layer {args.layer} {args.site}, width {args.width}, target L0 {args.target_l0:g}, "
          f"{args.tokens:,} training tokens, {records['centred']['tokens']:,} held-out tokens")  # fmt: skip
    print(
        f"{'':14s} {'train s':>8s} {'L0':>6s} {'FVU':>7s} {'ΔLM loss':>9s} {'recovered':>9s} {'dead':>5s}"
    )
    for name, r in records.items():
        print(f"{name:14s} {seconds[name]:8.0f} {r['l0']:6.1f} {r['fvu']:7.4f} "
              f"{r['delta_lm_loss']:9.3f} {r['frac_recovered']:9.3f} {r['dead']:5d}")  # fmt: skip
    c, s = records["centred"], records["standardized"]
    print(f"ratio centred / standardized: ΔLM loss {c['delta_lm_loss'] / s['delta_lm_loss']:.2f}, "
          f"FVU {c['fvu'] / s['fvu']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
