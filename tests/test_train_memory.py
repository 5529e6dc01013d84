"""The memory plan: its terms, its refusal before any work, and its peak against the measured one."""

import re
import subprocess

import pytest

from gemmascope.train import SAESpec, TrainConfig, plan_memory
from gemmascope.train.memory import PEAK_LINE, command_with_peak, sae_bytes, step_bytes

KEY = (6, "resid_post")


def test_weights_and_adam_state_grow_with_width_alone():
    cfg = TrainConfig(batch_size=4096)
    spec = SAESpec(6, "resid_post", 1 << 20, "jumprelu", target_l0=50)
    m, d = 1 << 20, 640
    # W_enc, W_dec, b_enc, threshold, b_dec; Adam's second moment the same; two int64 counters
    assert sae_bytes(spec, d, cfg) == 2 * 4 * (2 * m * d + 2 * m + d) + 16 * m
    # a step's buffers depend on the block, not on the width, once the width passes it
    wide = SAESpec(6, "resid_post", 1 << 18, "jumprelu", target_l0=50)
    assert 0 < step_bytes(spec, d, cfg) - step_bytes(wide, d, cfg) < 64 << 20  # [m] vectors
    momentum = TrainConfig(batch_size=4096, beta1=0.9)
    assert sae_bytes(spec, d, momentum) - sae_bytes(spec, d, cfg) == 4 * (2 * m * d + 2 * m + d)


def test_a_run_that_cannot_fit_is_refused_naming_what_would_fit():
    cfg = TrainConfig(batch_size=4096)
    specs = [SAESpec(6, "resid_post", 1 << 20, "jumprelu", target_l0=50)]
    plan = plan_memory(specs, cfg, {KEY: 640}, data_bytes=1 << 30, baseline=1 << 29,
                       available=8 << 30)  # fmt: skip
    assert plan.total > 8 << 30
    text = str(plan)
    assert "SAE weights and Adam state" in text and "peak" in text
    with pytest.raises(ValueError, match="memory") as err:
        plan.check(specs, cfg)
    for hint in ("--batch-size 1024", "--block-latents 4096", "--parallel latents"):
        assert hint in str(err.value)
    plan_memory(specs, cfg, {KEY: 640}, baseline=0, available=64 << 30).check(specs, cfg)


def test_the_train_command_refuses_before_any_work(gemma_layer6_cache, tmp_path):
    """A width whose weights alone pass the machine's memory stops at the plan: no run folder."""
    from gemmascope.train.job import TrainJob, run_job
    from gemmascope.train.sweep import Grid

    job = TrainJob(out=tmp_path / "run", activations=gemma_layer6_cache,
                   grid=Grid(layers="6", sites=["resid_post"], widths=[1 << 26], target_l0=[50.0]),
                   train=TrainConfig(tokens=8192, batch_size=4096))  # fmt: skip
    with pytest.raises(ValueError, match="needs about .* of memory at its peak"):
        run_job(job)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("width", [1 << 14, 1 << 16])
def test_the_plan_matches_the_measured_peak(gemma_layer6_cache, tmp_path, width):
    """The peak the `train` command prints before it starts is within 15% of the peak resident
    memory of its process (two dense steps, a checkpoint and the export included)."""
    cmd = [*command_with_peak(), "train", "--activations", str(gemma_layer6_cache), "--layers",
           "6", "--sites", "resid_post", "--widths", str(width), "--target-l0", "50", "--tokens",
           "2048", "--batch-size", "1024", "--block-latents", "16384", "--checkpoint-every", "1",
           "--out", str(tmp_path / "run")]  # one block, and four  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = float(re.search(r"peak\s+([\d,.]+) GiB", proc.stderr).group(1).replace(",", "")) * 2**30
    peak = int(proc.stderr.split(PEAK_LINE)[1].split()[0])
    assert abs(plan - peak) <= 0.15 * peak, f"plan {plan / 2**30:.2f} GiB, peak {peak / 2**30:.2f}"
