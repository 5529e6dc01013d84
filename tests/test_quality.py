"""The quality guard: the demo's SAE recipe, at a smaller size, on real Gemma 3 270M activations.

A change that makes SAEs worse (the one that moved `make demo` from 2.07 to 3.69 nats went unseen)
fails here: held-out ΔLM loss, dead latents and the L0 reached against the target have bounds, set
from a measured run of this very configuration (bench/RESULTS.md, "The quality guard") with room
for noise, not for a worse recipe: the same run with `--center` instead of `--standardize` fails
the ΔLM and the dead-latent bounds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gemmascope.activations import CacheConfig, CachedActivations, build_cache
from gemmascope.evaluate import evaluate
from gemmascope.models import load_model
from gemmascope.train import SAESpec, TrainConfig, train

TARGET_L0 = 50.0
MAX_DELTA_LM = 0.65
"""nats on 4k held-out tokens; measured 0.43 (with `--center` instead of `--standardize`: 5.53;
the demo's 800k token-steps reach 0.36)."""
MAX_DEAD = 0.01
"""share of latents silent on the held-out tokens; measured 0 (with `--center`: 2,019 of 4,096)."""
L0_ERROR = 0.15
"""the L0 reached may miss the target by this share; measured 44.8 for 50 (-10%) after these 390
steps (the demo's 781 reach 47.2)."""


@pytest.mark.slow
def test_the_demo_recipe_keeps_its_quality(tmp_path: Path) -> None:
    model, tokenizer = load_model("gemma-3-270m")
    cache = build_cache(
        CacheConfig(out=tmp_path / "cache", layers="6", sites=["resid_post"], tokens=100_000),
        model=model, tokenizer=tokenizer, progress=False,
    )  # fmt: skip
    key = (6, "resid_post")
    data = CachedActivations(cache, key, batch_size=1024, seed=0)
    spec = SAESpec(6, "resid_post", 4096, target_l0=TARGET_L0)
    cfg = TrainConfig(tokens=400_000, batch_size=1024, lr=2e-3, encoder_init_scale=0.1,
                      standardize=True, seed=0, model="gemma-3-270m")  # fmt: skip
    sae = train([spec], data.batches, cfg, tmp_path / "run", progress=False)[spec.name]
    (r,) = evaluate(model, tokenizer, [sae], tokens=4096, ablations=False, progress=False)
    report = f"ΔLM {r['delta_lm_loss']:.3f} nats, dead {r['dead']}, L0 {r['l0']:.1f}"
    assert r["delta_lm_loss"] <= MAX_DELTA_LM, report
    assert r["dead"] <= MAX_DEAD * spec.width, report
    assert abs(r["l0"] / TARGET_L0 - 1) <= L0_ERROR, report
