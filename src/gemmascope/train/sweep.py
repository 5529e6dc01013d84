"""The SAEs of a sweep: a grid given by flags (`Grid`), its expansion into specs, and sweep files."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gemmascope.common.config import check, option
from gemmascope.common.units import Width, parse_width
from gemmascope.models import Site, parse_layers
from gemmascope.sae import Architecture
from gemmascope.train.config import L0Size, SAESpec, TrainConfig


@dataclass
class Grid:
    """The SAEs of a sweep given by flags: sites x layers x widths x sparsities."""

    layers: str = ""
    """Layers of the grid: `6`, `0-17`, `3,6,9` (none: the SAEs of `--spec` alone)."""
    sites: list[Site] = dataclasses.field(default_factory=lambda: ["resid_post"])
    """Sites of the grid."""
    widths: list[Width] = option(default_factory=lambda: [16384], ge=1)
    """Widths of the grid, e.g. `4k,16k`."""
    architecture: Architecture = "jumprelu"
    """jumprelu, topk, batchtopk or relu."""
    target_l0: list[float] = option(default_factory=list, gt=0)
    """Target L0s (jumprelu), e.g. `20,50`: one SAE each."""
    l0_coefficient: list[float] = option(default_factory=list, ge=0)
    """Sparsity coefficients (lambda), e.g. `1e-3,3e-3`: one SAE each."""
    l0_size: list[L0Size] = option(default_factory=list)
    """Gemma Scope 2's named target L0s (jumprelu), e.g. `small,big`: one SAE each (docs/training.md)."""
    k: list[int] = option(default_factory=list, ge=1)
    """k values (topk/batchtopk), e.g. `32,64`: one SAE each."""
    target_site: Site | None = None
    """Train transcoders: predict this later site of the same layer (`--sites mlp_in --target-site
    mlp_out` stands in for the MLP)."""
    skip_connection: bool = False
    """Transcoders: add a learned linear skip `x @ W_skip` (affine skip transcoders)."""
    matryoshka: list[Width] = option(default_factory=list, ge=1)
    """Matryoshka prefixes: widths of nested prefixes that each reconstruct the input too, e.g. `256,1k`."""
    cross_layer: Literal["no", "also", "only"] = "no"
    """Transcoders: also (or only) train one cross-layer transcoder over all of `--layers`, each
    layer's latents writing to that layer's `--target-site` and every later one's."""

    def __post_init__(self) -> None:
        check(self)
        if self.cross_layer != "no" and self.target_site is None:
            raise ValueError(
                "--cross-layer trains cross-layer transcoders: give --target-site too (e.g. "
                "--sites mlp_in --target-site mlp_out)"
            )

    def specs(self, n_layers: int) -> list[SAESpec]:
        """The grid's SAEs (none without `layers`)."""
        if not self.layers:
            return []
        layers = parse_layers(self.layers, n_layers)
        options = dict(
            architecture=self.architecture, target_l0s=self.target_l0, l0_sizes=self.l0_size,
            l0_coefficients=self.l0_coefficient, ks=self.k, target_site=self.target_site,
            skip_connection=self.skip_connection, matryoshka=self.matryoshka,
        )  # fmt: skip
        specs = (
            []
            if self.cross_layer == "only"
            else expand_sweep(layers, self.sites, self.widths, **options)
        )
        if self.cross_layer != "no":
            if layers != list(range(layers[0], layers[0] + len(layers))):
                raise ValueError(
                    f"--cross-layer needs consecutive layers (a CLT writes every later one), got "
                    f"{self.layers!r}; give a range such as 0-17"
                )
            specs += expand_sweep(
                layers[:1], self.sites, self.widths, n_layers=len(layers), **options
            )
        return specs


def expand_sweep(
    layers: Iterable[int],
    sites: Iterable[str],
    widths: Iterable[int],
    *,
    architecture: str = "jumprelu",
    l0_coefficients: Iterable[float] = (),
    target_l0s: Iterable[float] = (),
    ks: Iterable[int] = (),
    l0_sizes: Iterable[str] = (),
    target_site: str | None = None,
    skip_connection: bool = False,
    aux_k: int = 0,
    matryoshka: Iterable[int | str] = (),
    n_layers: int | None = None,
) -> list[SAESpec]:
    """The grid sites x layers x widths x sparsities as specs (named L0 sizes unresolved: see
    `SAESpec.resolve`)."""
    sparsities = (
        [{"l0_coefficient": c} for c in l0_coefficients]
        + [{"target_l0": t} for t in target_l0s]
        + [{"l0_size": s} for s in l0_sizes]
        + [{"k": k} for k in ks]
    )
    if not sparsities:
        raise ValueError(
            "give at least one sparsity: l0 coefficients, target L0s, L0 sizes or k values"
        )
    return [
        SAESpec(
            layer=layer,
            site=site,
            width=w,
            architecture=architecture,
            target_site=target_site,
            skip_connection=skip_connection,
            aux_k=aux_k,
            matryoshka=[parse_width(w) for w in matryoshka],
            n_layers=n_layers,
            **sp,
        )
        for site in sites
        for layer in layers
        for w in widths
        for sp in sparsities
    ]


def load_sweep(path: str | Path) -> tuple[list[SAESpec], dict, dict]:
    """Read a sweep file (YAML or TOML): `saes` and/or a `sweep` grid, `train` options, and `source`.

    Returns `(specs, train_options, source_options)`; the README's "Command line" shows the layout.
    A file may hold no SAEs (only `train` options, say) when flags name them.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no sweep file at {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10: the same parser, as a package
            import tomli as tomllib

        data = tomllib.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    unknown = sorted(set(data) - {"saes", "sweep", "train", "source"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; expected saes, sweep, train, source")
    specs = []
    for i, s in enumerate(data.get("saes", [])):
        try:
            widths = {"width": parse_width(s.get("width", 0))}
            widths["matryoshka"] = [parse_width(w) for w in s.get("matryoshka", [])]
            specs.append(SAESpec(**{**s, **widths}))
        except TypeError as e:
            raise ValueError(f"{path}: saes[{i}]: {e}") from None
    if "sweep" in data:
        g = dict(data["sweep"])
        try:
            specs += expand_sweep(
                g.pop("layers"), g.pop("sites"), [parse_width(w) for w in g.pop("widths")], **g
            )
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: sweep needs layers, sites, widths and a sparsity list ({e})"
            ) from None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(data.get("train", {})) - fields)
    if bad:
        raise ValueError(f"{path}: unknown train options {bad}; valid: {sorted(fields)}")
    return specs, dict(data.get("train", {})), dict(data.get("source", {}))
