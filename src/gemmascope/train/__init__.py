"""Training: many SAEs from one read of the activations, the Gemma Scope recipe on sparse kernels.

`config` declares a run (its SAEs and the hyper-parameters they share; `sweep` expands a grid or
a sweep file into SAEs), `memory` plans its peak memory before it starts, `loop` runs it top to
bottom, `state` holds each SAE's parameters, optimizer state, checkpoints and export. A CPU step
(`step`) runs over blocks of latents; its math is in `objectives` (losses and their gradients),
`topk` (TopK/BatchTopK selection), `sparse` (kernels over the active latents), `dense` (the
autograd path for GPUs) and `optim` (Adam with unit-norm decoder rows, block by block).
"""

from gemmascope.train.batches import Batches, tensor_batches
from gemmascope.train.config import L0_SIZES, RECIPES, SAESpec, TrainConfig, named_l0
from gemmascope.train.loop import train
from gemmascope.train.memory import MemoryPlan, plan_memory
from gemmascope.train.state import Norm, Run, estimate_norms, export
from gemmascope.train.sweep import Grid, expand_sweep, load_sweep

__all__ = [
    "L0_SIZES",
    "RECIPES",
    "Batches",
    "Grid",
    "MemoryPlan",
    "Norm",
    "Run",
    "SAESpec",
    "TrainConfig",
    "estimate_norms",
    "expand_sweep",
    "export",
    "load_sweep",
    "named_l0",
    "plan_memory",
    "tensor_batches",
    "train",
]
