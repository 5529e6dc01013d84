"""What `tests/test_distributed.py` runs under `torchrun --nproc-per-node 2` (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py ROOT

ROOT holds what the test prepared (a corpus, an interrupted one-process run, a cache to resume);
each rank trains and caches into ROOT exactly as one process would, and the test compares.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gemmascope.activations import CacheConfig
from gemmascope.train import SAESpec, TrainConfig, tensor_batches, train

SITE = (0, "resid_post")
SPECS = [
    SAESpec(0, "resid_post", 64, "jumprelu", target_l0=5),
    SAESpec(0, "resid_post", 64, "topk", k=4, aux_k=8),
    SAESpec(0, "resid_post", 64, "batchtopk", k=4),
    SAESpec(0, "resid_post", 64, "relu", l0_coefficient=3e-3),
]
STEPS, CUT = 8, 5  # an interrupted run dies at step CUT, after its checkpoint at step 3


def data(n: int = 4096, d: int = 16, features: int = 48) -> torch.Tensor:
    """Sparse sums of unit directions plus noise, scaled like a real site."""
    g = torch.Generator().manual_seed(0)
    D = torch.randn(features, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    z = (torch.rand(n, features, generator=g) < 4 / features) * (
        0.5 + torch.rand(n, features, generator=g)
    )
    return 7.0 * z @ D + 0.01 * torch.randn(n, d, generator=g)


def config(**kw: Any) -> TrainConfig:
    base = dict(tokens=256 * STEPS, batch_size=256, lr=3e-3, log_every=2, checkpoint_every=3,
                dead_tokens=512, norm_batches=2, device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


class Killed(Exception):
    pass


def batches(cut: bool = False):
    def stream(start: int) -> Iterator[dict]:
        for i, b in enumerate(tensor_batches({SITE: data()}, 256)(start)):
            if cut and start == 0 and i == CUT:
                raise Killed
            yield b

    return stream


def cache_config(out: Path, corpus: Path, **kw: Any) -> CacheConfig:
    base = dict(model="tiny-gemma3", layers="0-2", sites=["resid_post", "mlp_out"], tokens=3000,
                corpus=str(corpus), context_size=16, batch_size=4, shard_tokens=700, device="cpu")  # fmt: skip
    return CacheConfig(out=out, **{**base, **kw})  # type: ignore[arg-type]


def suite_config(out: Path, corpus: Path) -> Any:
    """A two-layer suite of 4 SAEs whose caches go in two groups (the disk budget holds one layer)."""
    from gemmascope.evaluate import EvalConfig
    from gemmascope.suite import SuiteConfig

    return SuiteConfig(
        out=out, model="tiny-gemma3", layers="0-1", widths=[64], target_l0s=[2.0, 24.0],
        cache=CacheConfig(tokens=2048), eval=EvalConfig(tokens=256), corpus=str(corpus),
        eval_fraction=0.2, context_size=16, model_batch_size=4,
        train=TrainConfig(batch_size=128, lr=1e-2, checkpoint_every=8), disk_budget=600_000,
        device="cpu", base_model="test/tiny-saes",
    )  # fmt: skip


def main(root: Path) -> None:
    from conftest import build_tiny, tiny_tokenizer

    from gemmascope.activations import build_cache

    for mode in ("data", "latents"):
        train(SPECS, batches(), config(parallel=mode), root / mode, progress=False)
    try:  # a latent-sharded run killed after its checkpoint; one process resumes it
        train(
            SPECS, batches(cut=True), config(parallel="latents"), root / "cut_ranks", progress=False
        )
    except Killed:
        pass
    # a run one process started: two ranks finish it
    train(SPECS, batches(), config(parallel="data"), root / "cut_one", resume=True, progress=False)
    model, tok = build_tiny("gemma3"), tiny_tokenizer()
    for name in ("cache_ranks", "cache_resumed"):
        build_cache(cache_config(root / name, root / "docs.jsonl"), model=model, tokenizer=tok,
                    progress=False)  # fmt: skip
    from gemmascope.suite import build_suite

    build_suite(suite_config(root / "suite_ranks", root / "docs.jsonl"), model=model, tokenizer=tok,
                progress=False)  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
