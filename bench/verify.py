"""What checking a cache's integrity costs when it is opened for training, against training on it.

`CachedActivations` checks each shard's sha256 against the manifest when it opens a cache (so flipped
bytes never train) and every vector it reads for NaN/inf. This prints, side by side in one process:
opening without and with the sha256 check, one epoch of batches, and the demo SAE's training steps
over that epoch (width 4,096, batch 1,024, the `make demo` options), then the ratios.

    gemmascope cache --layers 6 --sites resid_post --tokens 200k --out demo-out/cache
    python bench/verify.py demo-out/cache --layer 6 --site resid_post
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

from gemmascope.activations import CachedActivations
from gemmascope.train import SAESpec, TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", help="a `gemmascope cache` folder holding the site")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--steps", type=int, default=60, help="training steps timed (then scaled)")
    args = ap.parse_args()
    key = (args.layer, args.site)

    t = time.perf_counter()
    CachedActivations(args.cache, key, verify=False)
    plain = time.perf_counter() - t
    t = time.perf_counter()
    data = CachedActivations(args.cache, key, batch_size=1024, verify=True)
    checked = time.perf_counter() - t
    shard_bytes = sum(
        meta["bytes"]
        for s in data.manifest["shards"]
        for rel, meta in s["files"].items()
        if rel.startswith(f"L{args.layer:02d}.{args.site}/")
    )
    t = time.perf_counter()
    batches = sum(1 for _ in itertools.islice(data.batches(), data.n_tokens // 1024))
    epoch = time.perf_counter() - t

    cfg = TrainConfig(tokens=1024 * args.steps, batch_size=1024, lr=2e-3, encoder_init_scale=0.1,
                      center=True, threshold_lr=1.0, frequency_penalty=0.0)  # fmt: skip
    spec = SAESpec(args.layer, args.site, 4096, target_l0=50.0)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        train([spec], data.batches, cfg, tmp, progress=False)
        steps = time.perf_counter() - t
    train_epoch = steps * batches / args.steps

    print(
        f"cache {args.cache}: {data.n_tokens:,} vectors, {shard_bytes / 2**20:,.0f} MiB of shards"
    )
    print(f"open, sizes only      {plain:8.3f} s")
    print(
        f"open, sha256 checked  {checked:8.3f} s  ({shard_bytes / 2**30 / max(checked, 1e-9):.2f} GiB/s)"
    )
    print(f"one epoch of batches  {epoch:8.3f} s  ({batches} batches of 1,024, NaN/inf checked)")
    print(f"training that epoch   {train_epoch:8.1f} s  (demo SAE, from {args.steps} timed steps)")
    print(f"ratio: sha256 check / one training epoch = {checked / train_epoch:.4f}")
    print(f"ratio: sha256 check / reading one epoch   = {checked / epoch:.3f}")


if __name__ == "__main__":
    main()
