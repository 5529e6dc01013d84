"""The quality guard: the default recipe at the demo's size, half its length, on real Gemma 3 270M
activations.

A change that makes SAEs worse (the one that moved `make demo` from 2.07 to 3.69 nats went unseen)
fails here: held-out ΔLM loss, dead latents and the L0 reached against the target have bounds, set
from a measured run of this very configuration (docs/training.md, "The quality guard") with room
for noise, not for a worse recipe: the same run with `--center` instead of the default
standardization fails all three bounds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gemmascope.activations import CachedActivations
from gemmascope.evaluate import evaluate
from gemmascope.models import load_model
from gemmascope.train import SAESpec, TrainConfig, train

TARGET_L0 = 50.0
MAX_DELTA_LM = 0.55
"""nats on 4k held-out tokens; measured 0.380 (`--frequency-penalty 0`: 0.412; `--center`: 5.40;
the demo's 800k token-steps reach 0.25)."""
MAX_DEAD = 0.01
"""share of latents silent on the held-out tokens; measured 10 of 4,096 (`--frequency-penalty 0`:
34; `--center`: 3,739)."""
L0_ERROR = 0.10
"""the L0 reached may miss the target by this share; measured 51.2 for 50 (+2.4%) after these 390
steps (`--center`: 4.8)."""


@pytest.mark.slow
def test_the_demo_recipe_keeps_its_quality(tmp_path: Path, gemma_layer6_cache: Path) -> None:
    model, tokenizer = load_model("gemma-3-270m")
    cache = gemma_layer6_cache  # 100k tokens of layer 6 resid_post, the train split
    key = (6, "resid_post")
    data = CachedActivations(cache, key, batch_size=1024, seed=0)
    spec = SAESpec(6, "resid_post", 4096, target_l0=TARGET_L0)
    cfg = TrainConfig(tokens=400_000, batch_size=1024, seed=0, model="gemma-3-270m")
    sae = train([spec], data.batches, cfg, tmp_path / "run", progress=False)[spec.name]
    (r,) = evaluate(model, tokenizer, [sae], tokens=4096, ablations=False, progress=False)
    report = f"ΔLM {r['delta_lm_loss']:.3f} nats, dead {r['dead']}, L0 {r['l0']:.1f}"
    assert r["delta_lm_loss"] <= MAX_DELTA_LM, report
    assert r["dead"] <= MAX_DEAD * spec.width, report
    assert abs(r["l0"] / TARGET_L0 - 1) <= L0_ERROR, report
