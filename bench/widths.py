"""Peak memory and speed of `gemmascope train` by width, 2^14 to 2^20 latents, against its plan.

For each width this runs the `train` command in a fresh process on a cache (the demo's by default)
twice: two steps from the default init, whose dense start is the run's memory peak (the process's
peak resident memory against the plan it printed, and the export at the end), and a few steps from
thresholds high enough that every step is sparse, for the steady speed (tokens/s between the last
logged steps). Then, in this process at width 16k, a step with Adam applied block by block to the
touched rows (`optim.RowAdam`, the trainer's) against whole gradients and dense Adam (its path
before blocks), alternated, for the ratio.

    python bench/widths.py [--cache demo-out/cache] [--widths 16k,64k,256k,1m] [--batch 4096]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from gemmascope.common.units import parse_width
from gemmascope.train.memory import PEAK_LINE, command_with_peak

GIB = 2**30


def run_train(cache: Path, width: int, batch: int, steps: int, out: Path, extra: list[str]):
    """Run `gemmascope train` in a child; its printed plan, its own peak resident memory (bytes), and
    the wall time."""
    cmd = [*command_with_peak(), "train", "--activations", str(cache),
           "--layers", "6", "--sites", "resid_post", "--widths", str(width), "--target-l0", "50",
           "--tokens", str(steps * batch), "--batch-size", str(batch), "--log-every", "1",
           "--out", str(out), *extra]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train failed at width {width}:\n{proc.stderr[-3000:]}")
    found = re.search(r"peak\s+([\d,.]+) GiB", proc.stderr)
    plan = float(found.group(1).replace(",", "")) * GIB if found else math.nan
    peak = int(proc.stderr.split(PEAK_LINE)[1].split()[0])
    return plan, peak, time.perf_counter() - t0


def steady_tokens_per_s(metrics: Path) -> float:
    """Tokens/s between the last two logged steps (`tokens_per_s` is cumulative from the start)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    (a, b) = rows[-2], rows[-1]
    ta, tb = a["tokens"] / a["tokens_per_s"], b["tokens"] / b["tokens_per_s"]
    return (b["tokens"] - a["tokens"]) / (tb - ta)


def sparse_threshold(width: int) -> float:
    """A threshold init at which about 50 of `width` latents fire per token at the start: the
    recipe's encoder (0.1 x unit rows) on inputs normalised to unit norm gives pre-activations of
    standard deviation about 0.1 / sqrt(d)."""
    z = statistics.NormalDist().inv_cdf(1 - 50 / width)
    return 0.1 * z / math.sqrt(640)


def row_adam_ratio(batch: int, repeats: int = 6) -> tuple[float, float]:
    """Seconds per 16k step at L0 ~50: Adam on blocks of touched rows (the trainer's) and whole
    gradients with dense Adam (before), alternated on one SAE."""
    import torch

    from gemmascope.train import SAESpec, TrainConfig
    from gemmascope.train.objectives import ALONE
    from gemmascope.train.optim import RowAdam
    from gemmascope.train.state import adam_update, new_run, place
    from gemmascope.train.step import forward_backward

    threshold = sparse_threshold(16384)
    cfg = TrainConfig(threshold_init=threshold)
    run = new_run(SAESpec(6, "resid_post", 16384, "jumprelu", target_l0=50), 640, cfg, 0)
    place(run, ALONE, torch.device("cpu"))
    run.objective.block = cfg.encoder_block
    x = torch.randn(batch, 640, generator=torch.Generator().manual_seed(0)) / math.sqrt(640)
    times: dict[str, list[float]] = {"rows": [], "dense": []}
    for step in range(2 * repeats + 2):
        way = "rows" if step % 2 else "dense"
        t0 = time.perf_counter()
        if way == "rows":
            sink = RowAdam(run.params, run.adam_v, run.adam_last, lr=1e-4, threshold_lr=10,
                           beta1=0, beta2=0.999, step=step)  # fmt: skip
            forward_backward(run.params, x, x, run.objective, ALONE, sink=sink)
        else:
            forward_backward(run.params, x, x, run.objective)
            adam_update(run, 1e-4, cfg, step)
            run.adam_last.fill_(step + 1)
        if step >= 2:  # the first two compile and warm up
            times[way].append(time.perf_counter() - t0)
        run.params.threshold.data.fill_(threshold)  # every step at L0 ~50, as a run's sparse ones
    return statistics.median(times["rows"]), statistics.median(times["dense"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("demo-out/cache"))
    ap.add_argument("--widths", default="16k,32k,64k,128k,256k,512k,1m")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steady-steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=6, help="16k steps of each kind timed")
    ap.add_argument("--only-ratio", action="store_true", help="skip the width sweep")
    args = ap.parse_args()
    print(f"batch {args.batch}, d 640, JumpReLU target L0 50, cache {args.cache}")
    print(f"{'width':>9} {'plan GiB':>9} {'peak GiB':>9} {'plan/peak':>9} {'weights+Adam GiB':>16} "
          f"{'tok/s':>8} {'s/step':>7}")  # fmt: skip
    for width in () if args.only_ratio else (parse_width(w) for w in args.widths.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            plan, peak, _ = run_train(args.cache, width, args.batch, 2, Path(tmp) / "a", [])
            steady = Path(tmp) / "b"
            run_train(args.cache, width, args.batch, args.steady_steps, steady,
                      ["--threshold-init", f"{sparse_threshold(width):.5f}"])  # fmt: skip
            tok_s = steady_tokens_per_s(steady / "metrics.jsonl")
        weights = 4 * 2 * (2 * width * 640 + 2 * width) + 16 * width
        print(f"{width:>9,} {plan / GIB:>9.2f} {peak / GIB:>9.2f} {plan / peak:>9.2f} "
              f"{weights / GIB:>16.2f} {tok_s:>8,.0f} {args.batch / tok_s:>7.1f}", flush=True)  # fmt: skip
    rows, dense = row_adam_ratio(args.batch, args.repeats)
    print(
        f"16k step, Adam on touched rows block by block {rows:.3f} s vs whole gradients and "
        f"dense Adam {dense:.3f} s: {dense / rows:.2f}x"
    )


if __name__ == "__main__":
    main()
