"""The memory a training run will take, printed before it starts: a run that cannot fit stops
there, naming what would make it fit, instead of being killed by the kernel mid-run.

The peak is what the process holds already (Python, torch, a streamed model), the activation
buffers, every SAE's parameters and Adam state (they live through the run), and the buffers of one
step of the widest SAE (SAEs step one after another). A CPU step holds one `[batch, block]` encoder
matrix and its siblings at a time (`TrainConfig.block_latents`) and gradients of one block of
latents at a time (`optim.RowAdam`), so what grows with width is the weights and their Adam state.
`bench/widths.py` compares the plan with the measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gemmascope.models import SiteKey, available_memory
from gemmascope.train.config import SAESpec, TrainConfig

BLOCK_COPIES = 5
"""`[batch, block]` float32 matrices alive at once in a dense block's gradient pass (measured)."""
SPARSE_ENTRY_BYTES = 64
"""Bytes per active entry kept between a step's passes (CSR, its transpose, values, window)."""
WORKSPACE = 1.10
"""Allocator slack on what a step allocates and frees (measured)."""


@dataclass
class MemoryPlan:
    """Bytes by what holds them, the machine's free memory, and the verdict."""

    items: dict[str, int] = field(default_factory=dict)
    available: int = 0
    saes: dict[str, int] = field(default_factory=dict)
    """Weights and Adam state of each SAE."""

    @property
    def total(self) -> int:
        return sum(self.items.values())

    def __str__(self) -> str:
        rows = [f"  {name:<40} {_gib(b):>10}" for name, b in self.items.items()]
        rows.append(f"  {'peak':<40} {_gib(self.total):>10} of {_gib(self.available)} free")
        return "memory plan:\n" + "\n".join(rows)

    def check(self, specs: list[SAESpec], cfg: TrainConfig) -> None:
        """Refuse a run whose peak is more than the free memory, naming what would bring it down."""
        if self.total <= self.available:
            return
        widest = max(self.saes, key=self.saes.__getitem__)
        ways = []
        if cfg.batch_size > 1024:
            ways.append(f"a smaller batch (--batch-size {cfg.batch_size // 4})")
        if cfg.encoder_block > 4096:
            ways.append(f"smaller encoder blocks (--block-latents {cfg.encoder_block // 4})")
        if len(specs) > 1:
            ways.append("fewer SAEs per run (train the sweep in parts)")
        ways.append(
            "the latents over several processes (torchrun --nproc-per-node N ... --parallel "
            "latents: each holds 1/N of every SAE's weights and Adam state)"
        )
        raise ValueError(
            f"this run needs about {_gib(self.total)} of memory at its peak but "
            f"{_gib(self.available)} is free ({', '.join(f'{k} {_gib(v)}' for k, v in self.items.items())}). "
            f"The largest SAE, {widest}, holds {_gib(self.saes[widest])} of weights and Adam "
            f"state. To fit, try: {'; '.join(ways)}"
        )


def plan_memory(
    specs: list[SAESpec],
    cfg: TrainConfig,
    widths: dict[SiteKey, int],
    *,
    data_bytes: int = 0,
    baseline: int | None = None,
    available: int | None = None,
    ranks: int = 1,
    data_parallel: bool = False,
    local_ranks: int = 1,
) -> MemoryPlan:
    """The peak memory of one process training `specs` on CPU activations of `widths` (`d` per
    site).

    Args:
        data_bytes: what the activation source holds at once (its `memory_bytes()`).
        baseline: what the process holds before training (default: its resident memory now).
        available: the memory free to it (default: MemAvailable plus its baseline, shared by the
            `local_ranks` processes of this machine).
        ranks: processes sharing each SAE's latents (`--parallel latents`): each holds 1/ranks.
        data_parallel: the batch is split over processes (`--parallel data`), which sum whole
            gradients before Adam.
    """
    base = resident_bytes() if baseline is None else baseline
    if available is None:
        available = (available_memory() + base * local_ranks) // local_ranks
    plan = MemoryPlan(
        available=available,
        saes={s.name: sae_bytes(s, widths[s.source], cfg) // ranks for s in specs},
    )
    plan.items["process (python, torch, a streamed model)"] = base
    plan.items["activation buffers"] = data_bytes
    plan.items["SAE weights and Adam state"] = sum(plan.saes.values())
    plan.items["one step's buffers"] = max(
        step_bytes(s, widths[s.source], cfg, ranks=ranks, whole_grads=data_parallel) for s in specs
    )
    return plan


def param_count(spec: SAESpec, d: int) -> int:
    """Numbers in one SAE's parameters (a CLT's layer i decodes into layers i..L-1)."""
    m, L = spec.width, spec.n_layers or 1
    count = L * (2 * m * d + 2 * m) + d * L
    if spec.n_layers is not None:
        count = L * (m * d + 2 * m) + m * d * L * (L + 1) // 2 + d * L
    return count + (L * d * d if spec.skip_connection else 0)


def sae_bytes(spec: SAESpec, d: int, cfg: TrainConfig) -> int:
    """Parameters, Adam's moments and the per-latent counters of one SAE, in bytes."""
    moments = 1 + (cfg.beta1 > 0)
    counters = 16 * spec.width * (spec.n_layers or 1)  # last_fired and adam_last, int64
    return 4 * param_count(spec, d) * (1 + moments) + counters


def step_bytes(spec: SAESpec, d: int, cfg: TrainConfig, *, ranks: int = 1,
               whole_grads: bool = False) -> int:  # fmt: skip
    """The buffers of one step of `spec` beyond its weights: the `[batch, block]` matrices, the
    gradients of one block of latents (of every parameter with `whole_grads`: a data-parallel
    run sums them over ranks before Adam), the active entries kept between the passes and the
    `[batch, d]` reconstructions. `ranks` share the latents."""
    B, m = cfg.batch_size, spec.width // ranks
    grads = 4 * param_count(spec, d) // ranks
    if spec.n_layers is not None:  # a CLT: whole-width matrices per layer, whole gradients
        return int(WORKSPACE * (4 * B * m * BLOCK_COPIES + grads))
    split_topk = (ranks > 1 or whole_grads) and spec.architecture in ("topk", "batchtopk")
    block = m if split_topk else min(m, cfg.encoder_block)  # as `step.forward_backward`
    matrices = 4 * B * block * BLOCK_COPIES
    grads = grads if whole_grads else 4 * 2 * block * d
    kept = SPARSE_ENTRY_BYTES * B * block // 8  # active entries kept between the passes, at most
    rows = 4 * B * d * (2 * (len(spec.matryoshka) + 1) + 4)  # reconstructions, errors, x, y
    return int(WORKSPACE * (matrices + grads + kept + rows + 4 * 8 * m))


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS), 0 where /proc is absent."""
    return _status("VmRSS")


def peak_bytes() -> int:
    """This process's peak resident memory so far (VmHWM), 0 where /proc is absent."""
    return _status("VmHWM")


def _status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _gib(b: int) -> str:
    return f"{b / 2**30:,.2f} GiB"


PEAK_LINE = "peak resident memory: "


def command_with_peak() -> list[str]:
    """`gemmascope` as a command that prints its process's peak resident memory on exit (the
    parent's `wait4` would count the memory of the process it was forked from, kept across exec)."""
    import sys

    code = ("import sys\nfrom gemmascope.cli import app\nfrom gemmascope.train.memory import "
            "PEAK_LINE, peak_bytes\ntry:\n    app()\nfinally:\n    print(PEAK_LINE, "
            "peak_bytes(), file=sys.stderr)")  # fmt: skip
    return [sys.executable, "-c", code]
