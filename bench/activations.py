"""Cache throughput against a bare forward: how much do hooks, gathering and writing shards cost?

Both run in this process on the same model and the same packed sequences of the default corpus:

- bare: `hooks.collect` of the deepest hooked layer's `resid_post` only, i.e. a forward stopped after
  that layer with nothing kept but one hook (tokenisation done beforehand, not timed);
- cache: `build_cache` writing every requested (layer, site) to a temporary folder (tokenising the
  corpus, gathering collected positions, casting, writing shards and checksums all timed).

Rates are forwarded positions per second; the goal is a ratio cache/bare of at least 0.9. Rounds
alternate the two so that load from other processes hits both alike.

    python bench/activations.py --layers 3,6,9 --sites resid_post,mlp_out,attn_z --tokens 4096
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from timing import Timed  # bench/ is on sys.path when a bench script runs

from gemmascope import hooks
from gemmascope.activations import CacheConfig, build_cache
from gemmascope.activations.files import read_manifest
from gemmascope.corpus import iter_documents, pack_sequences
from gemmascope.models import load_model, model_info, parse_layers


def bare(model: torch.nn.Module, seqs: list[torch.Tensor], batch_size: int, deepest: int) -> float:
    """Seconds to forward all sequences, stopped after `deepest`."""
    start = time.perf_counter()
    for i in range(0, len(seqs), batch_size):
        hooks.collect(
            model, torch.stack(seqs[i : i + batch_size]).long(), [(deepest, "resid_post")]
        )
    return time.perf_counter() - start


def cached(
    model: torch.nn.Module, tok: object, args: argparse.Namespace
) -> tuple[float, int, int, float]:
    """Seconds to build a cache, its sequences forwarded, its bytes on disk, and seconds in forwards."""
    with tempfile.TemporaryDirectory(prefix="gemmascope-bench-") as tmp:
        cfg = CacheConfig(out=Path(tmp) / "cache", model=args.model, layers=args.layers,
                          sites=args.sites.split(","), tokens=args.tokens, corpus=args.corpus,
                          context_size=args.context_size, batch_size=args.batch_size,
                          dtype=args.dtype)  # fmt: skip
        timed = Timed(hooks.collect)
        hooks.collect = timed  # activations looks it up at each forward
        start = time.perf_counter()
        try:
            build_cache(cfg, model=model, tokenizer=tok, progress=False)
        finally:
            hooks.collect = timed.inner
        seconds = time.perf_counter() - start
        manifest = read_manifest(cfg.out)
        last = manifest["shards"][-1]["index"]
        ids = load_file(cfg.out / "tokens" / f"shard-{last:05d}.safetensors")["sequence_ids"]
        bs = args.batch_size
        n_seq = -(-(int(ids.max()) + 1) // bs) * bs  # the last batch is filled up to batch_size
        disk = sum(m["bytes"] for s in manifest["shards"] for m in s["files"].values())
    return seconds, n_seq, disk, timed.seconds


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--layers", default="3,6,9")
    p.add_argument("--sites", default="resid_post,mlp_out,attn_z")
    p.add_argument("--tokens", type=int, default=4096, help="collected tokens per cache run")
    p.add_argument("--corpus", default="default")
    p.add_argument("--context-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    info = model_info(model)
    deepest = max(parse_layers(args.layers, info.n_layers))
    print(f"model {args.model}: {info.n_layers} layers, d_model {info.d_model}; loaded in "
          f"{time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")  # fmt: skip
    cached(model, tok, argparse.Namespace(**{**vars(args), "tokens": 1024}))  # warm-up
    docs = iter_documents(args.corpus, "train")
    n_seq = -(-args.tokens // (args.context_size - 1))
    seqs = [
        torch.from_numpy(s)
        for s in itertools.islice(pack_sequences(docs, tok, args.context_size), n_seq)
    ]
    bare_rates, cache_rates, forward_share = [], [], []
    for r in range(args.rounds):
        b = bare(model, seqs, args.batch_size, deepest)
        bare_rates.append(len(seqs) * args.context_size / b)
        c, c_seq, disk, fwd = cached(model, tok, args)
        cache_rates.append(c_seq * args.context_size / c)
        forward_share.append(fwd / c)
        print(f"round {r}: bare {bare_rates[-1]:,.0f} pos/s ({b:.1f} s); cache {cache_rates[-1]:,.0f} pos/s "
              f"({c:.1f} s, of which forwards {fwd:.1f} s; {args.tokens:,} tokens, {c_seq} sequences, "
              f"{disk / 2**20:.0f} MiB)")  # fmt: skip
    best_bare, best_cache = max(bare_rates), max(cache_rates)
    print(f"bare forward to layer {deepest}: {best_bare:,.0f} tokens/s (best of {args.rounds})")
    print(
        f"cache of layers {args.layers} x {args.sites} ({args.dtype}): {best_cache:,.0f} tokens/s"
    )
    print(f"ratio cache/bare: {best_cache / best_bare:.3f} (goal >= 0.9)")
    print(f"share of cache time in the forward itself: {min(forward_share):.3f} to {max(forward_share):.3f}"
          " (the rest is tokenising, gathering, casting and writing; less sensitive to other load)")  # fmt: skip


if __name__ == "__main__":
    main()
