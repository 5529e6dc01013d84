"""What a training run is: its SAEs (`SAESpec`, with Gemma Scope 2's named L0 sizes) and the
hyper-parameters they share (`TrainConfig` and its recipes). A sweep of SAEs is in `sweep`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from gemmascope.common.config import check, option
from gemmascope.common.devices import check_device
from gemmascope.common.units import Count
from gemmascope.models import SITES, SiteKey
from gemmascope.sae import Architecture

L0Size = Literal["small", "medium", "big"]
L0_SIZES: dict[str, tuple[int, int]] = {"small": (10, 20), "medium": (30, 60), "big": (60, 120)}
"""Gemma Scope 2's named L0 targets: (first layer, from a third of the depth on). As its releases
list them for every model, site and width: small and big from its all-layer sets, medium from its
four-layer sets (which use 60 -> 150 for big)."""


def named_l0(size: str, layer: int, n_layers: int) -> int:
    """Gemma Scope 2's target L0 `size` at `layer`: rising linearly over the first third of the
    layers, then flat (e.g. small: 10, 11, 13, 15, 16, 18, then 20 for Gemma 3 270M)."""
    if size not in L0_SIZES:
        raise ValueError(f"unknown L0 size {size!r}; choose one of {list(L0_SIZES)}")
    lo, hi = L0_SIZES[size]
    return math.floor(lo + (hi - lo) * min(1.0, 3 * layer / n_layers))


@dataclass
class SAESpec:
    """One SAE of a sweep."""

    layer: int = option(ge=0)
    """Layer the SAE reads."""
    site: str
    """Site the SAE reads (and reconstructs, unless `target_site`)."""
    width: int = option(ge=1)
    """Latents."""
    architecture: Architecture = "jumprelu"
    """jumprelu, topk, batchtopk or relu."""
    l0_coefficient: float | None = option(None, ge=0)
    """lambda of the L0 penalty (jumprelu), the L1 penalty (relu) or the target-L0 penalty."""
    target_l0: float | None = option(None, gt=0)
    """jumprelu: aim for this L0 with a quadratic penalty instead of a fixed lambda."""
    k: int | None = option(None, ge=1)
    """topk/batchtopk: active latents per token."""
    target_site: str | None = None
    """Transcoder: predict this later site of the same layer instead (`mlp_out` from `mlp_in`)."""
    skip_connection: bool = False
    """Transcoder: learn a linear skip `x @ W_skip` beside the latents (an affine skip transcoder)."""
    aux_k: int = option(0, ge=0)
    """topk/batchtopk: dead latents used by the AuxK loss (0 = off)."""
    matryoshka: list[int] = option(default_factory=list, ge=1)
    """Widths of nested prefixes of the dictionary that each reconstruct the input too (Matryoshka
    training: losses summed), e.g. `[256, 1024]` for a 4k SAE. Empty: plain training."""
    l0_size: L0Size | None = None
    """Gemma Scope 2's named target: `target_l0` from `L0_SIZES` at this layer (see `resolve`)."""
    n_layers: int | None = option(None, ge=1)
    """A cross-layer transcoder over this many layers from `layer` on: `width` latents per layer,
    each decoding into its layer's `target_site` and every later one's. None: one layer. A named L0
    size gives every layer its value at the last layer."""

    def __post_init__(self) -> None:
        check(self)
        where = f"SAE at layer {self.layer} {self.site} width {self.width}"
        if self.n_layers is not None and (
            self.target_site is None or self.matryoshka or self.aux_k
        ):
            raise ValueError(
                f"{where}: a cross-layer transcoder (`n_layers`) needs `target_site` and has no "
                "Matryoshka prefixes or AuxK"
            )
        order = {s: i for i, s in enumerate(SITES)}  # other names: the caller's own tensors
        if order.get(self.target_site or "", 99) <= order.get(self.site, -1):
            raise ValueError(
                f"{where}: a transcoder's target_site must come after its site in the block "
                f"({' -> '.join(SITES)}), e.g. site mlp_in, target_site mlp_out"
            )
        if self.skip_connection and self.target_site is None:
            raise ValueError(
                f"{where}: `skip_connection` is for transcoders (with `target_site`); an SAE that "
                "reconstructs its own input through a skip would learn the identity"
            )
        if list(self.matryoshka) != sorted(set(self.matryoshka)) or (
            self.matryoshka and self.matryoshka[-1] >= self.width
        ):
            raise ValueError(
                f"{where}: matryoshka prefixes {self.matryoshka} must increase and stay below the "
                f"width {self.width} (the whole dictionary is always the last prefix)"
            )
        if (
            self.architecture == "jumprelu"
            and self.l0_coefficient is None
            and self.target_l0 is None
            and self.l0_size is None
        ):
            raise ValueError(f"{where}: jumprelu needs `l0_coefficient`, `target_l0` or `l0_size`")
        if self.architecture in ("topk", "batchtopk") and not self.k:
            raise ValueError(f"{where}: {self.architecture} needs `k`")
        if self.architecture == "relu" and self.l0_coefficient is None:
            raise ValueError(f"{where}: relu needs `l0_coefficient` (its L1 coefficient)")
        for name in ("k", "target_l0"):
            value = getattr(self, name)
            if value is not None and value > self.width:
                raise ValueError(
                    f"{where}: {name}={value:g} is more than the width {self.width}: an SAE cannot "
                    "have more active latents than latents; lower it or widen the SAE"
                )

    def resolve(self, n_layers: int) -> SAESpec:
        """This spec with `target_l0` set from its `l0_size` for a model of `n_layers` layers."""
        if self.l0_size is None or self.target_l0 is not None:
            return self
        layer = self.layer + (self.n_layers or 1) - 1
        return dataclasses.replace(self, target_l0=float(named_l0(self.l0_size, layer, n_layers)))

    @property
    def layers(self) -> range:
        """The layers it reads and writes: one, or a cross-layer transcoder's."""
        return range(self.layer, self.layer + (self.n_layers or 1))

    @property
    def keys(self) -> list[SiteKey]:
        """Every `(layer, site)` its steps read: its inputs, then its targets (when others)."""
        sites = [self.site] if self.target_site is None else [self.site, self.target_site]
        return [(layer, site) for site in sites for layer in self.layers]

    @property
    def source(self) -> SiteKey:
        return (self.layer, self.site)

    @property
    def target(self) -> SiteKey:
        return (self.layer, self.target_site or self.site)

    @property
    def name(self) -> str:
        arch = self.architecture
        if self.k:
            sparsity = f"k{self.k}"
        elif self.l0_size is not None:
            sparsity = f"l0_{self.l0_size}"
        elif self.target_l0 is not None:
            sparsity = f"l0_{self.target_l0:g}"
        else:
            sparsity = f"lambda{self.l0_coefficient:g}"
        tc = f"_to_{self.target_site}" if self.target_site else ""
        tc += "_skip" if self.skip_connection else ""
        nested = "_matryoshka" if self.matryoshka else ""
        where = f"layer_{self.layer}"
        if self.n_layers is not None:
            where = f"clt_{self.layers.start}-{self.layers.stop - 1}"
        return f"{where}_{self.site}{tc}_w{self.width}_{arch}{nested}_{sparsity}"


BLOCK_BYTES = 256 << 20
"""The float32 `[batch, block]` encoder matrix of a step is at most this by default."""

RECIPES: dict[str, dict[str, float | bool]] = {
    "short": {
        "lr": 2e-3,
        "threshold_lr": 10.0,
        "encoder_init_scale": 0.1,
        "standardize": True,
        "frequency_penalty": 0.1,
    },
    "paper": {
        "lr": 7e-5,
        "threshold_lr": 1.0,
        "encoder_init_scale": 1.0,
        "standardize": False,
        "frequency_penalty": 0.0,
    },
}
"""The values each recipe gives the options left unset (`TrainConfig.recipe`)."""


@dataclass
class TrainConfig:
    """Hyper-parameters shared by every SAE of a run: Gemma Scope's (App. B), except the few that
    `recipe` sets, whose defaults suit short runs unless `recipe` is `paper`."""

    tokens: Count = option(2_000_000, ge=1)
    """Activation vectors to train on, e.g. 2M (more than a cache holds loop over it in epochs)."""
    batch_size: int = option(4096, ge=1)
    """Activation vectors per step."""
    recipe: Literal["short", "paper"] = "short"
    """Defaults of the options marked so: `short` (what measured best on runs of 1M tokens or
    fewer, bench/recipe.py) or `paper` (Gemma Scope's App. B recipe as published). They are filled
    in when the config is made; `dataclasses.replace` keeps the filled values."""
    lr: float | None = option(None, gt=0)
    """Adam learning rate (recipe: short 2e-3, paper 7e-5)."""
    lr_warmup_steps: int = option(1000, ge=0)
    """Cosine warm-up from 0.1*lr; never longer than 5% of a short run."""
    l0_warmup_steps: int = option(10_000, ge=0)
    """Linear warm-up of the sparsity coefficient from 0; never longer than 25% of a short run."""
    beta1: float = option(0.0, ge=0, lt=1)
    """Adam's first-moment decay (Gemma Scope: 0, no momentum)."""
    beta2: float = option(0.999, ge=0, lt=1)
    """Adam's second-moment decay."""
    bandwidth: float = option(0.001, gt=0)
    """Width of the kernel of the JumpReLU straight-through estimator."""
    threshold_init: float = option(0.001, ge=0)
    """JumpReLU threshold at init."""
    threshold_lr: float | None = option(None, gt=0)
    """Learning rate of the JumpReLU thresholds as a multiple of `lr` (recipe: short 10, paper 1).
    The thresholds' large gradients of the dense start fill Adam's second-moment estimate and shrink
    their later steps, so at 1 L0 is still falling when a short run ends."""
    frequency_penalty: float | None = option(None, ge=0)
    """Gemma Scope 2's secondary penalty (jumprelu): coefficient of sum_j max(0, f_j /
    `max_frequency` - 1)^2, f_j the share of a batch's tokens latent j fires on, warmed up with the
    L0 penalty (recipe: short 0.1, paper 0 = off). Not applied to cross-layer transcoders, whose
    latents it kills (docs/circuits.md)."""
    max_frequency: float = option(0.1, gt=0, le=1)
    """The firing share above which `frequency_penalty` applies; for an SAE with a target L0, never
    under 4 x target / width (so a narrow SAE's target is not fought: 4 x 50 / 4,096 is 0.05)."""
    encoder_init_scale: float | None = option(None, gt=0)
    """W_enc = scale * W_dec^T at init (recipe: short 0.1, paper 1). The paper's 1 starts with
    about half the latents firing and a reconstruction ~m/(2d) times too large, which a long run
    forgets; 0.1 (like SAELens' 0.1 decoder norm) makes the dense start a few steps long."""
    center: bool = False
    """Subtract each site's mean, estimated with C before training and folded into b_enc and
    b_dec after it (encodings unchanged), without `standardize` unless it is given too. Not in the
    paper; Gemma 3's residual stream is mostly one constant direction, which otherwise costs short
    runs dense latents and dead ones."""
    standardize: bool | None = None
    """Subtract each site's mean and divide each dimension by its standard deviation (floored at
    1% of the median), estimated before training and folded into the weights after it (encodings
    unchanged); implies `center` (recipe: short on, paper off). The loss then weighs every
    dimension alike instead of being dominated by the few massive ones of Gemma's residual
    stream, which the model mostly normalises away (bench/sensitivity.py)."""
    norm_batches: int = option(8, ge=1)
    """Batches used to estimate the input scale C with E||x/C||^2 = 1 before training."""
    dead_tokens: int = option(10_000_000, ge=1)
    """A latent that has not fired in this many tokens counts as dead (capped at a quarter of the run)."""
    matmul_dtype: Literal["float32", "bfloat16", "float16"] = option("float32", flags=("--dtype",))
    """Dtype of the dense products (CPU: the encoder matmul; GPU: encoder and decoder); parameters,
    thresholds and Adam states stay float32."""
    device: str = "auto"
    """cpu (sparse numba kernels), cuda, cuda:N, mps (torch path), or auto: this rank's GPU if any."""
    parallel: Literal["data", "latents"] = "data"
    """Under torchrun: split each batch's rows over the ranks (data), or each SAE's latents (latents:
    for SAEs too wide for one device). Either way the result equals one process's."""
    max_density: float = option(0.02, gt=0, le=1)
    """TopK/BatchTopK AuxK and logging: a latent firing on more than this share of tokens is dense."""
    block_latents: int | None = option(None, ge=1)
    """Latents per block of the encoder matmul on the CPU: a step's widest matrix is [batch,
    block] float32 instead of [batch, width]. None: what 256 MiB holds (16,384 at batch 4,096);
    narrower SAEs run in one block."""
    seed: int = option(0, ge=0)
    """Seed of SAE init and data order."""
    log_every: int = option(10, ge=1)
    """Steps between lines of metrics.jsonl (and the progress bar's figures)."""
    checkpoint_every: int = option(200, ge=1)
    """Steps between checkpoints: at most this much training is redone after a kill."""
    dataset: str | None = option(None, cli=False)
    """The corpus the activations came from, recorded in each SAE's config."""
    context_size: int | None = option(None, cli=False, ge=2)
    """Tokens per sequence of those activations, recorded in each SAE's config."""
    model: str | None = option(None, cli=False)
    """The model the SAEs read, recorded in each SAE's config."""

    def __post_init__(self) -> None:
        check(self)
        check_device(self.device)
        self.apply_recipe()
        self.check_run()

    def apply_recipe(self) -> None:
        """Give the options left unset their `recipe`'s values (`center` asks for centring alone)."""
        if self.center and self.standardize is None:
            self.standardize = False
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def check_run(self) -> None:
        """What the fields must hold together: a run of at least one batch."""
        if self.tokens < self.batch_size:
            raise ValueError(
                f"`tokens`={self.tokens} is less than one batch (`batch_size`={self.batch_size})"
            )

    @property
    def encoder_block(self) -> int:
        """Latents per block of the encoder matmul (`block_latents`)."""
        return self.block_latents or max(1, BLOCK_BYTES // (4 * self.batch_size))

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def lr_at(self, step: int) -> float:
        warm = min(self.lr_warmup_steps, max(1, self.steps // 20))
        if step >= warm:
            return self.lr
        return self.lr * (0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * step / warm)))

    def coefficient_at(self, step: int, final: float) -> float:
        warm = min(self.l0_warmup_steps, max(1, self.steps // 4))
        return final if warm == 0 else final * min(1.0, step / warm)


@dataclass
class TrainFlags(TrainConfig):
    """`TrainConfig` as flags: each value checked alone. A sweep file's options (`train`) or the
    suite (`suite`) complete them into the `TrainConfig` that runs, which checks them together."""

    def apply_recipe(self) -> None:
        pass

    def check_run(self) -> None:
        pass
