"""Training: many SAEs from one read of the activations, the Gemma Scope recipe on sparse kernels.

`config` declares a run (its SAEs and the hyper-parameters they share; `sweep` expands a grid or
a sweep file into SAEs), `loop` runs it top to bottom, `state` holds each SAE's parameters, optimizer state, checkpoints and export; the
math of a step is in `objectives` (losses and their gradients), `sparse` (kernels over the active
latents), `dense` (the autograd path for GPUs) and `optim` (Adam with unit-norm decoder rows).
"""

from gemmascope.train.config import L0_SIZES, RECIPES, SAESpec, TrainConfig, named_l0
from gemmascope.train.loop import Batches, tensor_batches, train
from gemmascope.train.state import Norm, Run, estimate_norms, export
from gemmascope.train.sweep import Grid, expand_sweep, load_sweep

__all__ = [
    "L0_SIZES",
    "RECIPES",
    "Batches",
    "Grid",
    "Norm",
    "Run",
    "SAESpec",
    "TrainConfig",
    "estimate_norms",
    "expand_sweep",
    "export",
    "load_sweep",
    "named_l0",
    "tensor_batches",
    "train",
]
