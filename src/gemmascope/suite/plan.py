"""The plan of a suite before it runs: disk, memory and time, from the model's shapes and measured speed.

Disk: an activation cache holds `tokens x (sum of site widths x itemsize + 24)` bytes per layer; layers
are cached in groups small enough for the disk budget, each group's cache dropped once its SAEs are
trained. Memory: the model, the largest (layer, site)'s SAEs with their Adam state and gradients, and
the loader's shuffle buffers. Time: a few forwards and SAE steps are timed on this machine
(`measure_rates`), then scaled by the work each stage does (`stage_estimates`). `flop_estimate` gives
the same plan's time on another accelerator from FLOP counts, for deciding where to run it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gemmascope.activations.files import TOKEN_BYTES
from gemmascope.activations.reader import buffers_bytes
from gemmascope.hooks import decoder_layers
from gemmascope.models import SiteKey
from gemmascope.train import memory as train_memory
from gemmascope.train.config import SAESpec, TrainConfig

DENSE_SHARE = 0.25
"""Share of training steps assumed to run the dense path (L0 is high until the penalty warms up)."""
CACHE_OVERHEAD = 1.1
"""Cache time over bare forward time (hooks, copies, hashing; bench/RESULTS.md measured ~1.09)."""
SAE_TRAIN_FLOPS = 10
"""FLOPs per token per d_in x width of one dense SAE step: encode, decode and three gradients, 2 each."""


@dataclass
class Plan:
    """What a suite will do and need, from shapes alone (see the module docstring)."""

    layers: list[int]
    sites: list[str]
    widths: list[int]
    target_l0s: list[float]
    site_widths: dict[str, int]
    """Activation width of each site."""
    groups: list[list[int]]
    """Layers cached together, in order; each group's cache is dropped once its SAEs are trained."""
    n_layers: int
    cache_bytes_per_layer: int
    """Bytes of one layer's cache (every site) over all tokens."""
    sae_bytes: int
    """Bytes of every trained SAE as saved (float32), once; published copies take as much again."""
    peak_disk: int
    """Largest group cache + one training checkpoint + the SAEs and their published copies."""
    peak_memory: int
    """Model + the largest (layer, site)'s SAEs in training + shuffle buffers, in bytes."""

    @property
    def keys(self) -> list[SiteKey]:
        return [(layer, site) for layer in self.layers for site in self.sites]

    @property
    def n_saes(self) -> int:
        return len(self.keys) * len(self.widths) * len(self.target_l0s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_suite(
    info: Any,
    layers: list[int],
    sites: list[str],
    widths: list[int],
    target_l0s: list[float],
    *,
    tokens: int,
    itemsize: int,
    model_bytes: int,
    buffer_size: int,
    batch_size: int,
    disk_budget: int,
) -> Plan:
    """Group the layers so each group's cache fits `disk_budget` next to the SAEs, and size the run.

    Args:
        info: the model's `ModelInfo`.
        layers, sites, widths, target_l0s: the grid.
        tokens: activation vectors per (layer, site), cached and trained on.
        itemsize: bytes per cached value (4 for float32, 2 for bfloat16).
        model_bytes: bytes of the model's weights.
        buffer_size: vectors per shuffle buffer of the loader (it holds about three).
        batch_size: tokens per training step.
        disk_budget: bytes the suite may use on disk, caches and outputs together.
    Returns:
        The plan; raises `ValueError` if not even one layer's cache fits.
    """
    site_widths = {s: info.site_width(s) for s in sites}
    per_layer = tokens * (sum(site_widths.values()) * itemsize + TOKEN_BYTES)
    per_sae = {s: sum(4 * (2 * d * w + 2 * w + d) for w in widths) for s, d in site_widths.items()}
    sae_bytes = len(layers) * len(target_l0s) * sum(per_sae.values())
    checkpoint = 2 * max(per_sae.values()) * len(target_l0s)  # weights + Adam, one (layer, site)
    room = disk_budget - 2 * sae_bytes - checkpoint
    if room < per_layer:
        raise ValueError(
            f"the disk budget {fmt_bytes(disk_budget)} holds no layer's cache ({fmt_bytes(per_layer)}: "
            f"{tokens:,} tokens x {len(sites)} site(s)) beside the SAEs and their published copies "
            f"({fmt_bytes(2 * sae_bytes + checkpoint)}); raise --disk-budget, ask for fewer --tokens, "
            "or store the cache as --cache-dtype bfloat16"
        )
    per_group = min(len(layers), room // per_layer)
    n_groups = math.ceil(len(layers) / per_group)
    size = math.ceil(len(layers) / n_groups)  # balanced: 18 layers, 7 fit -> 6, 6, 6
    groups = [layers[i : i + size] for i in range(0, len(layers), size)]
    d_max = max(site_widths.values())
    # a train stage: one (layer, site)'s SAEs, with the trainer's own plan (`train.memory`)
    train = TrainConfig(tokens=batch_size, batch_size=batch_size)
    specs = [
        SAESpec(0, "resid_post", w, "jumprelu", target_l0=t) for w in widths for t in target_l0s
    ]
    sae_train = sum(train_memory.sae_bytes(s, d_max, train) for s in specs)
    sae_train += max(train_memory.step_bytes(s, d_max, train) for s in specs)
    return Plan(
        layers=layers, sites=sites, widths=widths, target_l0s=target_l0s, site_widths=site_widths,
        groups=groups, n_layers=info.n_layers, cache_bytes_per_layer=per_layer, sae_bytes=sae_bytes,
        peak_disk=max(map(len, groups)) * per_layer + checkpoint + 2 * sae_bytes,
        peak_memory=model_bytes + sae_train + buffers_bytes(buffer_size, d_max, prefetch=1),
    )  # fmt: skip


@dataclass
class Rates:
    """Speeds measured on this machine at the start of a suite (tokens per second)."""

    device: str
    body: float
    """Forward through every layer, no unembedding (what caching runs)."""
    lm: float
    """Forward with logits (what evaluation runs)."""
    train_dense: dict[str, float] = field(default_factory=dict)
    """`"{d_in}x{width}"` -> tokens/s of one SAE's training step while most latents fire."""
    train_sparse: dict[str, float] = field(default_factory=dict)
    """The same once L0 is near its target (the sparse path)."""


def measure_rates(
    model: Any,
    info: Any,
    shapes: list[tuple[int, int]],
    *,
    target_l0: float,
    batch_size: int,
    model_batch_size: int,
    context_size: int,
    vocab_size: int,
    repeats: int = 2,
) -> Rates:
    """Time a few forwards and SAE steps of each `(d_in, width)` in `shapes` (one warm-up each).

    Args:
        model, info: the loaded model and its `ModelInfo`.
        shapes: the (d_in, width) pairs of the suite's SAEs.
        target_l0: L0 the sparse-path timing runs at.
        batch_size: tokens per SAE step; model_batch_size, context_size: one forward's shape.
        vocab_size: token ids are drawn below this.
        repeats: timed repetitions of each (after one warm-up).
    Returns:
        The measured `Rates`.
    """
    from gemmascope.hooks import collect

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    rows = min(model_batch_size, 2)  # throughput hardly grows past a couple of sequences on a CPU
    ids = torch.randint(3, vocab_size, (rows, context_size), generator=g).to(device)
    n, last = ids.numel(), [(info.n_layers - 1, "resid_post")]
    with torch.inference_mode():
        model(ids[:1, :16])  # warm-up on a short input
        body = n / _timed(lambda: collect(model, ids, last), repeats, warm=False)
        lm = n / _timed(lambda: model(ids).logits, repeats, warm=False)
    rates = Rates(device=str(device), body=body, lm=lm)
    for d_in, width in shapes:
        dense, sparse = _time_sae_step(d_in, width, target_l0, batch_size, repeats, device)
        rates.train_dense[f"{d_in}x{width}"] = batch_size / dense
        rates.train_sparse[f"{d_in}x{width}"] = batch_size / sparse
    return rates


def _timed(fn: Any, repeats: int, *, warm: bool = True) -> float:
    if warm:
        fn()  # warm-up: allocations, kernel compilation
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - t0) / repeats


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_sae_step(
    d_in: int, width: int, target_l0: float, batch: int, repeats: int, device: torch.device
) -> tuple[float, float]:
    """Seconds of one JumpReLU step of `batch` rows (gradients + an Adam-like update): at init, then
    at L0 ~ target."""
    from gemmascope.train.config import BLOCK_BYTES
    from gemmascope.train.objectives import Objective, Params, encoder_pre
    from gemmascope.train.step import forward_backward

    if device.type != "cpu":  # the trainer's path off the CPU
        from gemmascope.train.dense import dense_forward_backward as forward_backward
    g = torch.Generator().manual_seed(0)
    p = Params(d_in, width, 0.001, g).to(device)
    rows = min(batch, 1024)  # a step's time grows linearly with its rows: time a smaller one
    x = torch.randn(rows, d_in, generator=g).to(device)  # (rows, d_in)
    block = BLOCK_BYTES // (4 * batch) if device.type == "cpu" else 0  # the trainer's
    obj = Objective("jumprelu", coefficient=1.0, target_l0=target_l0, block=block)
    state = {n: torch.zeros_like(q) for n, q in p.named_parameters()}

    def step() -> None:
        forward_backward(p, x, x, obj)
        with torch.no_grad():
            for name, q in p.named_parameters():
                state[name].mul_(0.999).addcmul_(q.grad, q.grad, value=0.001)
                q.data.addcdiv_(q.grad, state[name].sqrt().add_(1e-8), value=-1e-12)
                q.grad = None

    dense = _timed(step, repeats)
    with torch.no_grad():  # one threshold for all latents that lets about target_l0 fire per token
        pre = encoder_pre(x[:64], p, torch.float32).flatten()  # (64 * width,)
        sample = pre[torch.randperm(len(pre), generator=g)[: 1 << 20].to(pre.device)]
        p.threshold.fill_(float(sample.quantile(1 - min(target_l0 / width, 1.0))))
    return dense * batch / rows, _timed(step, repeats) * batch / rows


def stage_estimates(plan: Plan, rates: Rates, cfg: Any) -> dict[str, float]:
    """Seconds each stage should take at `rates`: `cache:g`, `train:Lxx.site`, `index:g`, `eval:g`
    (see suite)."""
    from gemmascope.activations import site_dir

    out: dict[str, float] = {}
    n = plan.n_layers
    steps = cfg.train_tokens // cfg.batch_size
    for g, layers in enumerate(plan.groups):
        depth = (max(layers) + 1) / n
        out[f"cache:{g}"] = CACHE_OVERHEAD * cfg.tokens * depth / rates.body
        for key in [(layer, s) for layer in layers for s in plan.sites]:
            per_step = 0.0
            for w in plan.widths:
                shape = f"{plan.site_widths[key[1]]}x{w}"
                dense = cfg.batch_size / rates.train_dense[shape]
                sparse = cfg.batch_size / rates.train_sparse[shape]
                per_step += (DENSE_SHARE * dense + (1 - DENSE_SHARE) * sparse) * len(
                    plan.target_l0s
                )
            out[f"train:{site_dir(key)}"] = steps * per_step
        out[f"index:{g}"] = _index_seconds(plan, layers, rates, cfg)
        out[f"eval:{g}"] = _eval_seconds(
            plan, layers, cfg.eval_tokens, rates, cfg.ablations
        ) + _extra_eval_seconds(plan, layers, rates, cfg)
    return out


INDEX_STEP_SHARE = 0.5
"""Indexing one token costs an SAE about half a dense training step (an encode and the statistics'
top-k merges, no decode or backward)."""


def _index_seconds(plan: Plan, layers: list[int], rates: Rates, cfg: Any) -> float:
    """One forward of the index tokens up to the group's deepest layer, then each SAE's encode and
    statistics (suites planned before there was an index stage had none)."""
    tokens = getattr(cfg, "index_tokens", 0)
    per_token = 0.0
    for w in plan.widths:
        for s in plan.sites:
            shape = f"{plan.site_widths[s]}x{w}"
            per_token += INDEX_STEP_SHARE * len(plan.target_l0s) / rates.train_dense[shape]
    forward = tokens * (max(layers) + 1) / plan.n_layers / rates.body
    return forward + tokens * per_token * len(layers)


def _extra_eval_seconds(plan: Plan, layers: list[int], rates: Rates, cfg: Any) -> float:
    """Absorption, sparse probing and auto-interpretation, per layer: their forwards up to the layer
    (prompts of 11 words at ~8 tokens a word; probing windows; the eval tokens again), absorption's
    probes per SAE on the CPU and the explainer's answers."""
    from gemmascope.evaluate.absorption import PROBE_SECONDS_PER_LATENT
    from gemmascope.evaluate.spelling import TOKENS_PER_WORD

    evals = getattr(cfg, "eval_evals", ["core"])
    tokens, probes = 0.0, 0.0
    if "absorption" in evals:
        tokens += cfg.eval_absorption_words * TOKENS_PER_WORD
        saes = len(plan.widths) * len(plan.target_l0s) * len(plan.sites)
        probes = (PROBE_SECONDS_PER_LATENT * cfg.eval_absorption_words / 20_000
                  * sum(plan.widths) / len(plan.widths) * saes)  # fmt: skip
    if "sparse_probing" in evals:
        windows = len(cfg.eval_probe_tasks) * (cfg.eval_probe_train + cfg.eval_probe_test)
        tokens += windows * cfg.eval_probe_context
    if "autointerp" in evals:  # its contexts' forward, then 3 requests per latent
        from gemmascope.evaluate.autointerp import ASK_SECONDS

        tokens += cfg.eval_tokens
        saes = len(plan.widths) * len(plan.target_l0s) * len(plan.sites)
        probes += 3 * cfg.eval_autointerp_latents * saes * ASK_SECONDS
    n = plan.n_layers
    return sum(tokens / rates.body * (layer + 1) / n + probes for layer in layers)


def _eval_seconds(
    plan: Plan, layers: list[int], tokens: int, rates: Rates, ablations: bool
) -> float:
    """Per layer (each evaluated on its own, see suite): one clean forward, the site means up to
    it, a spliced forward per SAE from the layer on, and two ablations per site."""
    n = plan.n_layers
    body, lm = tokens / rates.body, tokens / rates.lm
    head = max(lm - body, 0.0)
    per_key = len(plan.widths) * len(plan.target_l0s) + (2 if ablations else 0)
    return sum(
        lm
        + (body * (layer + 1) / n if ablations else 0.0)
        + (head + body * (n - layer - 1) / n) * len(plan.sites) * per_key
        for layer in layers
    )


# ------------------------------------------------------------------ another accelerator, from FLOPs
@dataclass
class Accelerator:
    """Peak speeds of an accelerator and the share of them a run is assumed to reach."""

    name: str
    matmul_flops: float
    """Peak dense matmul FLOP/s at the precision the run uses."""
    efficiency: float
    """Share of the peak assumed reached (model forwards and SAE steps alike)."""
    disk_bytes_per_s: float
    """Sequential write and read speed of the disk holding the cache."""


# Efficiencies measured on one H100 80GB HBM3 (2026-11-26) with a random-init Gemma 3 270M and dense
# JumpReLU steps at batch 4,096: float32 forwards and SAE steps reached 31-37 TFLOP/s (~50% of the
# float32 peak); with bfloat16 or TF32 matmuls 62-100 TFLOP/s (~10% of the bfloat16 peak), as the
# elementwise work of a 270M model and of a JumpReLU then dominates. Disk speed is an assumption.
H100_FP32 = Accelerator("one H100, float32", 67e12, 0.5, 2e9)
H100_BF16 = Accelerator("one H100, bfloat16/TF32 matmuls", 989e12, 0.1, 2e9)


def model_flops(model: Any, info: Any, context_size: int) -> tuple[float, float]:
    """FLOPs per token of one layer's forward (weights + causal attention), and of the unembedding."""
    layer_params = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    attention = 2 * context_size * info.n_heads * info.head_dim  # QK^T and AV, causal average
    out = model.get_output_embeddings()
    head = 2 * out.weight.numel() if out is not None else 0
    return 2 * layer_params + attention, float(head)


def flop_estimate(
    plan: Plan, cfg: Any, layer_flops: float, head_flops: float, acc: Accelerator
) -> dict[str, float]:
    """Seconds per stage kind (`cache`, `train`, `eval`, `disk`) of the plan on `acc`, from FLOPs."""
    rate = acc.matmul_flops * acc.efficiency
    n = plan.n_layers
    cache = sum(cfg.tokens * layer_flops * (max(g) + 1) for g in plan.groups) / rate
    train = sum(
        cfg.train_tokens * SAE_TRAIN_FLOPS * plan.site_widths[s] * w * len(plan.target_l0s)
        for _, s in plan.keys
        for w in plan.widths
    ) / rate  # fmt: skip
    body = cfg.eval_tokens * layer_flops * n
    lm_rates = Rates(device=acc.name, body=rate * cfg.eval_tokens / body,
                     lm=rate * cfg.eval_tokens / (body + cfg.eval_tokens * head_flops))  # fmt: skip
    evals = sum(  # absorption's probes run on the CPU, at this machine's measured rate
        _eval_seconds(plan, g, cfg.eval_tokens, lm_rates, cfg.ablations)
        + _extra_eval_seconds(plan, g, lm_rates, cfg)
        for g in plan.groups
    )
    disk = 2 * len(plan.layers) * plan.cache_bytes_per_layer / acc.disk_bytes_per_s  # write + read
    return {"cache": cache, "train": train, "eval": evals, "disk": disk}


def fmt_bytes(n: float) -> str:
    """`1.5 GB` style (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_seconds(s: float) -> str:
    """`3 h 05 min`, `12 min 30 s` or `45 s`."""
    s = max(0.0, s)
    if s >= 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    if s >= 60:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{s:.0f} s"
