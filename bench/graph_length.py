"""Attribution graphs on long prompts: time and peak memory against prompt length, with the rows
capped at `--max-feature-nodes` latents so memory grows linearly with the prompt.

Each length runs in a process of its own (its peak resident set size is its own): Gemma 3 270M, a
prompt cut from the default corpus's held-out text, 18 MLP transcoders (`--transcoders`, any folder
`io.load_transcoders` reads, or random ones of `--width` latents and about `--l0` active per token).
Prints, per length, the active latents, the seconds, the peak GiB, and what the uncapped graph's
adjacency alone would take.

    python bench/graph_length.py --transcoders runs/transcoders --lengths 64,256,1024
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def worker(length: int, args: argparse.Namespace) -> None:
    """One length: the graph, reported as JSON."""
    from gemmascope import io
    from gemmascope.circuits import attribute
    from gemmascope.corpus import iter_documents
    from gemmascope.models import load_model

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model, tokenizer = load_model()
    text = ""
    for doc in iter_documents("default", "eval"):
        text += doc + "\n"
        if len(text) > 8 * length:
            break
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:length]
    if args.transcoders:
        tcs = io.load_transcoders(args.transcoders, args.pick)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from graph import random_set

        tcs = random_set(model, ids[:64], args.width, args.l0)
    start = time.perf_counter()
    g = attribute(model, tokenizer, ids, tcs, batch_size=args.batch_size,
                  max_feature_nodes=args.max_feature_nodes, progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    full = (g.n_features + len(g.logit_ids)) * g.adjacency.shape[1] * 4 / 2**30
    print(json.dumps({"tokens": len(ids), "features": g.n_features, "rows": g.adjacency.shape[0],
                      "seconds": seconds, **g.scores(), "uncapped_adjacency_gib": full,
                      "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="64,256,1024", help="prompt lengths in tokens")
    ap.add_argument("--max-feature-nodes", type=int, default=512)
    ap.add_argument("--transcoders", type=Path, help="a folder of trained MLP transcoders")
    ap.add_argument("--pick", help="text the transcoders' ids contain")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=50.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args)
    print(f"max_feature_nodes {args.max_feature_nodes}, batch {args.batch_size}, "
          f"{os.environ.get('THREADS', '2')} threads")  # fmt: skip
    print(f"{'tokens':>7} {'latents':>9} {'rows':>6} {'seconds':>8} {'peak GiB':>9} "
          f"{'GiB/token':>10} {'uncapped adjacency GiB':>23} {'replacement':>12}")  # fmt: skip
    for length in (int(n) for n in args.lengths.split(",")):
        argv = [sys.executable, __file__, *sys.argv[1:], "--worker", str(length)]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"length {length} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['tokens']:>7} {r['features']:>9,} {r['rows']:>6} {r['seconds']:>8.1f} "
              f"{r['peak_gib']:>9.2f} {r['peak_gib'] / r['tokens']:>10.4f} "
              f"{r['uncapped_adjacency_gib']:>23.1f} {r['replacement']:>12.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
