"""The suite folder: where each stage's files go, and `suite.json`, the manifest of the whole run.

Layout of the suite folder (`OUT/`):

    suite.json                 config, plan, measured speeds and each stage's state (written atomically)
    cache/group-00/            activation cache of one group of layers (`gemmascope cache` layout),
                               dropped once the group's SAEs are trained (kept with `keep_cache`)
    runs/L03.resid_post/       the `train` run of every SAE of one (layer, site): metrics.jsonl and
                               one folder per SAE, all trained from one read of its activations
    index/L03.resid_post/NAME.sqlite   the feature index of every SAE, for `gemmascope explore OUT`
    results/L03.json           `evaluate` records of one layer's SAEs; results.json holds them all
    publish/                   Gemma Scope layout: {site}/layer_{L}/width_{W}/average_l0_{N}/params.npz,
                               README.md (model card), eval_results.json
    report/index.html          Pareto fronts, metrics by layer, density histograms
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from gemmascope.activations import site_dir
from gemmascope.activations.files import disk_free
from gemmascope.common.config import flat
from gemmascope.common.files import read_versioned
from gemmascope.suite.config import SuiteConfig, identity_defaults
from gemmascope.suite.plan import (
    Plan,
    Rates,
    fmt_bytes,
    measure_rates,
    model_flops,
    plan_suite,
    stage_estimates,
)

FORMAT = "gemmascope-suite"
FORMAT_VERSION = 1


def cache_dir(out: Path, group: int) -> Path:
    """The activation cache of one group of layers."""
    return out / "cache" / f"group-{group:02d}"


def run_dir(out: Path, key: tuple[int, str]) -> Path:
    """The training run of every SAE of one (layer, site)."""
    return out / "runs" / site_dir(key)


def results_file(out: Path, layer: int) -> Path:
    """Where the suite at `out` keeps the evaluation records of one layer's SAEs."""
    return out / "results" / f"L{layer:02d}.json"


def stage_names(plan: Plan) -> list[str]:
    """Every stage of a plan, in the order they run."""
    names: list[str] = []
    for g, layers in enumerate(plan.groups):
        names.append(f"cache:{g}")
        names += [f"train:{site_dir((layer, s))}" for layer in layers for s in plan.sites]
        names += [f"index:{g}", f"eval:{g}"]
    return [*names, "publish", "report"]


def read_manifest(out: str | Path) -> dict[str, Any]:
    """`suite.json` of the suite at `out`, checking its format."""
    return read_versioned(
        Path(out) / "suite.json", FORMAT, FORMAT_VERSION,
        fix="start the suite in a new folder (this one cannot be resumed)",
        missing=f"is {out} a suite made by `gemmascope suite`?",
    )  # fmt: skip


def open_manifest(cfg: SuiteConfig) -> dict[str, Any] | None:
    file = cfg.out / "suite.json"
    if not file.exists():
        if cfg.out.exists() and any(cfg.out.iterdir()):
            raise FileExistsError(
                f"{cfg.out}: not empty and holds no suite.json; give --out a new or empty folder"
            )
        return None
    manifest = read_manifest(cfg.out)
    mine, theirs = cfg.identity(), manifest["identity"]
    # a field added since the suite was made counts as its default there
    theirs = {**{k: v for k, v in identity_defaults().items() if k in mine}, **theirs}
    diffs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diffs:
        detail = "; ".join(
            f"{k}: suite has {theirs.get(k)!r}, this run {mine.get(k)!r}" for k in diffs
        )
        raise ValueError(
            f"{file}: written by a different command ({detail}); rerun the same command to resume, "
            "or give --out a new folder"
        )
    return manifest


def new_manifest(
    cfg: SuiteConfig, model: Any, tokenizer: Any, info: Any, layers: list[int]
) -> dict[str, Any]:
    free = disk_free(cfg.out)
    budget = cfg.disk_budget if cfg.disk_budget is not None else free
    if budget > free:
        raise ValueError(
            f"--disk-budget {fmt_bytes(budget)} is more than the {fmt_bytes(free)} free at "
            f"{cfg.out}; lower it or free some space"
        )
    itemsize = torch.empty(0, dtype=getattr(torch, cfg.cache.dtype)).element_size()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = plan_suite(
        info, layers, cfg.sites, cfg.widths, cfg.target_l0s,
        tokens=cfg.cache.tokens, itemsize=itemsize, model_bytes=model_bytes,
        buffer_size=min(cfg.buffer_size, cfg.cache.tokens), batch_size=cfg.train.batch_size,
        disk_budget=budget,
    )  # fmt: skip
    shapes = sorted({(d, w) for d in plan.site_widths.values() for w in cfg.widths})
    rates = measure_rates(
        model, info, shapes, target_l0=min(cfg.target_l0s), batch_size=cfg.train.batch_size,
        model_batch_size=cfg.model_batch_size, context_size=cfg.context_size,
        vocab_size=len(tokenizer),
    )  # fmt: skip
    config = flat(cfg)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": cfg.identity(),
        "config": config,
        "disk_budget": budget,
        "plan": plan.to_dict(),
        "rates": dataclasses.asdict(rates),
        "estimates": stage_estimates(plan, rates, SimpleNamespace(**config)),
        "flops": dict(
            zip(("layer", "head"), model_flops(model, info, cfg.context_size), strict=True)
        ),
        "stages": {},
    }


def plan_of(manifest: dict[str, Any]) -> Plan:
    """The `Plan` recorded in a manifest."""
    return Plan(**manifest["plan"])


def rates_of(manifest: dict[str, Any]) -> Rates:
    """The `Rates` recorded in a manifest."""
    return Rates(**manifest["rates"])


def config_view(manifest: dict[str, Any]) -> SimpleNamespace:
    """A manifest's config by flag name, as attributes (what the estimators read)."""
    return SimpleNamespace(**manifest["config"])
