"""The quality guard's run (`tests/test_quality.py`) under other options, to see what its bounds catch.

Builds (once) the guard's 100k-token cache of Gemma 3 270M layer 6 `resid_post`, trains the guard's
SAE (width 4,096, target L0 50, 400k token-steps at batch 1,024, seed 0) once per set of options
given as JSON (`{}` is the default recipe), and evaluates all of them together on the guard's 4,096
held-out tokens.

    python bench/guard.py '{}' '{"frequency_penalty": 0}' '{"center": true}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from gemmascope.activations import CacheConfig, CachedActivations, build_cache
from gemmascope.evaluate import evaluate
from gemmascope.models import cache_dir, load_model
from gemmascope.train import SAESpec, TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("options", nargs="*", default=["{}"], help="TrainConfig options as JSON")
    ap.add_argument("--cache", type=Path, default=None, help="where the guard's cache goes")
    args = ap.parse_args()
    model, tokenizer = load_model("gemma-3-270m")
    cache = args.cache or cache_dir() / "bench" / "guard-l6-resid_post-100k"
    if not (cache / "manifest.json").exists():
        build_cache(CacheConfig(out=cache, layers="6", sites=["resid_post"], tokens=100_000),
                    model=model, tokenizer=tokenizer, progress=False)  # fmt: skip
    data = CachedActivations(cache, (6, "resid_post"), batch_size=1024, seed=0)
    spec = SAESpec(6, "resid_post", 4096, target_l0=50.0)
    saes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(args.options):
            cfg = TrainConfig(**{"tokens": 400_000, "batch_size": 1024, "seed": 0,
                                 "model": "gemma-3-270m", **json.loads(text)})  # fmt: skip
            saes[text] = train([spec], data.batches, cfg, f"{tmp}/{i}", progress=False)[spec.name]
    records = evaluate(model, tokenizer, list(saes.values()), tokens=4096, ablations=False,
                       progress=False)  # fmt: skip
    for text, r in zip(saes, records, strict=True):
        print(f"{text}: ΔLM loss {r['delta_lm_loss']:.3f} nats, dead {r['dead']} of "
              f"{spec.width:,}, L0 {r['l0']:.1f}, FVU {r['fvu']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
