"""The training recipe, option by option: which combination makes the best SAE on a short run.

Every variant trains the same SAE (layer 6 `resid_post` of Gemma 3 270M, width 4,096, target L0 50,
batch 1,024; `make demo`'s size by default) on the same cached activations in the same order, in
this process; then all are evaluated together on the same held-out tokens. `gemmascope`'s default
is the row `default`; `gemmascope-paper` is Gemma Scope's own recipe (`--recipe paper`); each
other row changes one thing from the default, so each line reads as that option's effect.

    gemmascope cache --layers 6 --sites resid_post --tokens 200k --out demo-out/cache
    python bench/recipe.py demo-out/cache
"""

from __future__ import annotations

import argparse
import tempfile
import time

from gemmascope.activations import CachedActivations
from gemmascope.evaluate import evaluate
from gemmascope.models import load_model
from gemmascope.train import SAESpec, TrainConfig, train

VARIANTS: dict[str, tuple[dict, dict]] = {
    # name: (TrainConfig options, SAESpec options), each relative to the default
    "default": ({}, {}),
    "gemmascope-paper": ({"recipe": "paper"}, {}),
    "frequency-penalty 0": ({"frequency_penalty": 0.0}, {}),
    "frequency-penalty 0.3": ({"frequency_penalty": 0.3}, {}),
    "threshold-lr 1": ({"threshold_lr": 1.0}, {}),
    "threshold-lr 30": ({"threshold_lr": 30.0}, {}),
    "center, no standardize": ({"center": True}, {}),
    "encoder-init-scale 1": ({"encoder_init_scale": 1.0}, {}),
    "lr 4e-3": ({"lr": 4e-3}, {}),
    "l0-warmup-steps 40 (5%)": ({"l0_warmup_steps": 40}, {}),
    "matryoshka 256,1k": ({}, {"matryoshka": [256, 1024]}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", help="a `gemmascope cache` folder holding the site")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--target-l0", type=float, default=50.0)
    ap.add_argument("--tokens", type=int, default=800_000, help="training tokens per SAE")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = ap.parse_args()

    key = (args.layer, args.site)
    data = CachedActivations(args.cache, key, batch_size=1024, seed=0)
    saes, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (options, spec_options)) in enumerate(VARIANTS.items()):
            if args.only and name not in args.only:
                continue
            spec = SAESpec(args.layer, args.site, args.width, target_l0=args.target_l0,
                           **spec_options)  # fmt: skip
            cfg = TrainConfig(tokens=args.tokens, batch_size=1024, seed=0, **options)
            t0 = time.perf_counter()
            saes[name] = train([spec], data.batches, cfg, f"{tmp}/{i}", progress=False)[spec.name]
            seconds[name] = time.perf_counter() - t0
            print(f"trained {name} in {seconds[name]:.0f} s", flush=True)
    model, tok = load_model(args.model)
    records = dict(zip(saes, evaluate(model, tok, list(saes.values()), tokens=args.eval_tokens,
                                      progress=False), strict=True))  # fmt: skip
    first = next(iter(records.values()))
    print(f"layer {args.layer} {args.site}, width {args.width}, target L0 {args.target_l0:g}, "
          f"{args.tokens:,} training tokens, {first['tokens']:,} held-out tokens")  # fmt: skip
    print(f"{'':24s} {'train s':>7s} {'L0':>6s} {'L0 err':>7s} {'FVU':>7s} {'ΔLM loss':>9s} "
          f"{'recovered':>9s} {'dead':>5s} {'>10%':>5s}")  # fmt: skip
    for name, r in records.items():
        err = r["l0"] / args.target_l0 - 1
        print(f"{name:24s} {seconds[name]:7.0f} {r['l0']:6.1f} {err:+7.1%} {r['fvu']:7.4f} "
              f"{r['delta_lm_loss']:9.3f} {r['frac_recovered']:9.3f} {r['dead']:5d} "
              f"{r['dense']:5d}")  # fmt: skip


if __name__ == "__main__":
    main()
