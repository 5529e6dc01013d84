"""Prompt search over a whole suite: how long `POST /api/prompt` and `GET /api/search` take with every
SAE of a Gemma 3 270M suite loaded, against the bare forward of the same text.

The suite is 18 layers x 3 sites (resid_post, mlp_out, attn_out) x 2 SAEs = 108 random JumpReLU SAEs
of `--width` latents (thresholds set so that about `--l0` fire per token), each with an index file
that holds its meta and empty statistics (what the two requests read of an index is its meta and the
maxima of the latents that fire). The SAEs are handed to the explorer already loaded, as after its
first request. Both requests go through the whole app (FastAPI TestClient): one forward stopped after
the deepest layer, every SAE's encoder, the top latents per token and the index lookups. The bare
forward runs the same token ids through the model alone, in the same process, alternating rounds.

    python bench/prompt.py                              # 108 SAEs x 16,384 latents (about 9 GB)
    python bench/prompt.py --width 4096 --layers 0-5    # quicker
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gemmascope.evaluate.feature_stats import FeatureStats, token_decoder
from gemmascope.explore.app import create_app
from gemmascope.explore.lens import LogitLens
from gemmascope.explore.live import Live
from gemmascope.explore.store import write_index
from gemmascope.hooks import collect
from gemmascope.models import load_model, model_info, parse_layers
from gemmascope.sae import SAE, SAEConfig

TEXT = "The whale swam slowly across the cold northern ocean, singing to the rest of its pod."


def random_sae(d: int, width: int, layer: int, site: str, l0: float, x: torch.Tensor,
               seed: int) -> SAE:  # fmt: skip
    """A random JumpReLU SAE whose thresholds make about `l0` of `width` latents fire on `x`."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(width, d, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    threshold = (x @ w_dec.T).quantile(1 - l0 / width, dim=0).clamp(min=1e-3)  # (m,)
    cfg = SAEConfig("jumprelu", d, width, layer=layer, site=site, model="gemma-3-270m")
    arrays = {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(width),
              "b_dec": torch.zeros(d), "threshold": threshold}  # fmt: skip
    return SAE.from_arrays(cfg, arrays).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--layers", default="all")
    p.add_argument("--sites", default="resid_post,mlp_out,attn_out")
    p.add_argument("--per-site", type=int, default=2, help="SAEs per (layer, site)")
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--l0", type=float, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    model, tok = load_model("gemma-3-270m")
    info = model_info(model)
    layers, sites = parse_layers(args.layers, info.n_layers), args.sites.split(",")
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    sample = collect(model, ids, [(layer, s) for layer in layers for s in sites])
    live = Live("cpu", model=model, tokenizer=tok)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gemmascope-bench-") as tmp:
        n = 0
        for layer in layers:
            for site in sites:
                for j in range(args.per_site):
                    key = f"L{layer:02d}.{site}.{j}"
                    x = sample[layer, site][0]
                    sae = random_sae(info.site_width(site), args.width, layer, site, args.l0, x, n)
                    _empty_index(Path(tmp) / f"{key}.sqlite", key, sae, tok)
                    live._saes[key] = sae  # as after the explorer's first request
                    n += 1
        app = create_app(tmp, live=live)
        print(f"{n} SAEs of {args.width:,} latents, {len(layers)} layers x {len(sites)} sites: made "
              f"in {time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}; "
              f"text of {ids.shape[1]} tokens")  # fmt: skip
        from fastapi.testclient import TestClient

        client = TestClient(app, base_url="http://127.0.0.1")
        body = {"text": TEXT, "width": args.width}
        rows = client.post("/api/prompt", json=body).json()["rows"]  # warm-up
        print(f"one prompt reads {len(rows)} SAEs (one per layer and site at the chosen width)")
        bare, prompt, search = [], [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            with torch.no_grad():
                model(ids)
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = client.post("/api/prompt", json=body)
            prompt.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
            t = time.perf_counter()
            r = client.get("/api/search", params={"q": "whale"})
            search.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    b, pr, se = (statistics.median(v) for v in (bare, prompt, search))
    print(f"bare forward of the text: {b:.3f} s (median of {args.rounds})")
    print(f"POST /api/prompt, {len(rows)} SAEs: {pr:.3f} s; ratio to the bare forward {pr / b:.1f}")
    print(
        f"GET /api/search?q=whale, all {n} SAEs: {se:.3f} s; ratio to the bare forward {se / b:.1f}"
    )


def _empty_index(path: Path, key: str, sae: SAE, tok: Any) -> None:
    """An index file with the SAE's meta and statistics of no tokens (see the module docstring)."""
    m = sae.cfg.d_sae
    stats = FeatureStats(m, top_k=1, window=0, bands=1, samples=1, bins=2)
    zeros, none = torch.zeros(m, 1), torch.zeros(m, 1, dtype=torch.long)
    meta = {"model": "gemma-3-270m", "sae_source": key, "sae_name": key, "layer": sae.cfg.layer,
            "site": sae.cfg.site, "d_sae": m, "special_ids": [], "tokens_indexed": 0}  # fmt: skip
    write_index(path, meta, stats, LogitLens(zeros, none, zeros, none), token_decoder(tok), 8)


if __name__ == "__main__":
    main()
