"""Feature-index throughput against a bare forward: how much do the SAEs and the per-latent merges cost?

Both run in this process on the same model and the same packed sequences:

- bare: `hooks.collect` of the SAEs' sites only, i.e. a forward stopped after the deepest of them
  (tokenisation done beforehand, not timed);
- index: `build_indexes` of `--saes` SAEs (a suite's layer group: one at each of `--saes` layers
  spread evenly up to `--layer`) over the same number of positions, one forward per chunk for all of
  them, from tokenising the corpus to the last chunk merged (encodes, top-k and band merges,
  histograms, checkpoints). The logit lens and the SQLite write happen once per index, not per token,
  and are timed and reported on their own.

The SAE is random (unit decoder rows, tied encoder) with per-latent JumpReLU thresholds set on a first
batch so that about `--l0` latents fire per token, as in a trained SAE; merge costs grow with L0.
Rates are positions per second; the ratio index/bare is what the per-chunk SAE work costs. Rounds
alternate the two so that load from other processes hits both alike.

    python bench/index.py --width 16384 --tokens 16384            # Gemma 3 270M, layer 9
    python bench/index.py --width 4096 --saes 4 --tokens 16384    # a group of 4 SAEs, layers 0-9
    python bench/index.py --tiny --width 4096 --tokens 65536       # tiny random model, quick check
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from timing import Timed  # bench/ is on sys.path when a bench script runs

from gemmascope import hooks
from gemmascope.corpus import iter_documents, pack_sequences
from gemmascope.explore import index as index_module
from gemmascope.explore.index import IndexConfig, build_indexes
from gemmascope.hooks import collect
from gemmascope.models import load_model, model_info
from gemmascope.sae import SAE, SAEConfig


def random_sae(model: Any, seqs: list[torch.Tensor], layer: int, site: str, width: int,
               l0: float) -> SAE:  # fmt: skip
    """A random JumpReLU SAE whose thresholds make about `l0` latents fire per token."""
    d = model_info(model).site_width(site)
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(width, d, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    x = collect(model, torch.stack(seqs[:1]).long(), [(layer, site)])[layer, site][0, 1:]  # (T, d)
    pre = x @ w_dec.T  # (T, m)
    threshold = pre.quantile(1 - l0 / width, dim=0)  # (m,)
    cfg = SAEConfig("jumprelu", d, width, layer=layer, site=site)
    arrays = {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(width),
              "b_dec": torch.zeros(d), "threshold": threshold.clamp(min=1e-3)}  # fmt: skip
    return SAE.from_arrays(cfg, arrays).eval()


def bare(model: Any, seqs: list[torch.Tensor], batch_size: int, saes: list[SAE]) -> float:
    """Seconds to forward all sequences to the deepest of the SAEs' sites."""
    sites = [(s.cfg.layer, s.cfg.site) for s in saes]
    start = time.perf_counter()
    for i in range(0, len(seqs), batch_size):
        collect(model, torch.stack(seqs[i : i + batch_size]).long(), sites)
    return time.perf_counter() - start


def indexed(
    model: Any, tok: Any, saes: list[SAE], args: argparse.Namespace
) -> tuple[float, float, float, float, int]:
    """Seconds for the chunk loop, in forwards within it, for the logit lens, for the rest
    (checkpoint, SQLite write), and the bytes of the index."""
    marks: list[float] = []
    lens, forward = Timed(index_module.logit_lens), Timed(hooks.collect)
    index_module.logit_lens, hooks.collect = lens, forward  # both are looked up when they run
    with tempfile.TemporaryDirectory(prefix="gemmascope-bench-") as tmp:
        cfgs = [IndexConfig(sae_source="random", out=Path(tmp) / f"index{i}.sqlite", model=args.model,
                            corpus=args.corpus, tokens=args.tokens, context_size=args.context_size,
                            batch_size=args.batch_size) for i in range(len(saes))]  # fmt: skip
        start = time.perf_counter()
        try:
            build_indexes(cfgs, model=model, tokenizer=tok, saes=list(saes), progress=False,
                          on_chunk=lambda _: marks.append(time.perf_counter()))  # fmt: skip
        finally:
            index_module.logit_lens, hooks.collect = lens.inner, forward.inner
        end = time.perf_counter()
        loop = marks[-1] - start
        return (
            loop,
            forward.seconds,
            lens.seconds,
            end - marks[-1] - lens.seconds,
            sum(c.out.stat().st_size for c in cfgs),
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--tiny", action="store_true", help="a tiny random Gemma 3 instead of --model")
    p.add_argument("--layer", type=int, default=9, help="the deepest SAE's layer")
    p.add_argument("--saes", type=int, default=1, help="SAEs indexed from one forward")
    p.add_argument("--site", default="resid_post")
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--l0", type=float, default=64)
    p.add_argument("--tokens", type=int, default=16384, help="positions per run")
    p.add_argument("--corpus", default="default")
    p.add_argument("--context-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    t0 = time.perf_counter()
    model, tok = _tiny(args) if args.tiny else load_model(args.model)
    print(f"model {'tiny gemma3' if args.tiny else args.model}: loaded in {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    n_seq = -(-args.tokens // args.context_size)
    docs = iter_documents(args.corpus, "train")
    seqs = [torch.from_numpy(s) for s in itertools.islice(pack_sequences(docs, tok, args.context_size), n_seq)]  # fmt: skip
    layers = [round(args.layer * (i + 1) / args.saes) for i in range(args.saes)]
    saes = [random_sae(model, seqs, layer, args.site, args.width, args.l0) for layer in layers]
    positions = len(seqs) * args.context_size
    bare_rates, index_rates, shares = [], [], []
    for r in range(args.rounds):
        b = bare(model, seqs, args.batch_size, saes)
        loop, fwd, lens, rest, size = indexed(model, tok, saes, args)
        bare_rates.append(positions / b)
        index_rates.append(positions / loop)
        shares.append(fwd / loop)
        print(f"round {r}: bare {bare_rates[-1]:,.0f} pos/s ({b:.1f} s); index {index_rates[-1]:,.0f} "
              f"pos/s ({loop:.1f} s, of which forwards {fwd:.1f} s); once per index: logit lens {lens:.1f} s, checkpoint + SQLite "
              f"write {rest:.1f} s ({size / 2**20:.1f} MiB)")  # fmt: skip
    best_bare, best_index = max(bare_rates), max(index_rates)
    print(f"bare forward to layer {args.layer} {args.site}: {best_bare:,.0f} positions/s")
    print(f"index of {len(saes)} SAE(s) at layers {layers}, {args.width:,} latents each, L0 "
          f"~{args.l0:g}: {best_index:,.0f} positions/s")  # fmt: skip
    print(f"ratio index/bare: {best_index / best_bare:.3f}")
    print(f"share of the index loop in the forward itself: {min(shares):.3f} to {max(shares):.3f} "
          "(the rest is tokenising, encoding and merging; less sensitive to other load)")  # fmt: skip


def _tiny(args: argparse.Namespace) -> tuple[Any, Any]:
    """A tiny random Gemma 3 with the real Gemma tokenizer, for a quick run without the model."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    _, tok = load_model(args.model)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=args.layer + 1, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=16, max_position_embeddings=args.context_size,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False), tok


if __name__ == "__main__":
    main()
