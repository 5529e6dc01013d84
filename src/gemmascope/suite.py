"""One command builds a whole Gemma Scope-style suite: plan, cache, train, evaluate, publish, report.

Layout of the suite folder (`OUT/`):

    suite.json                 config, plan, measured speeds and each stage's state (written atomically)
    cache/group-00/            activation cache of one group of layers (`gemmascope cache` layout),
                               dropped once the group's SAEs are trained (kept with `keep_cache`)
    runs/L03.resid_post/       the `train` run of every SAE of one (layer, site): metrics.jsonl and
                               one folder per SAE, all trained from one read of its activations
    results/L03.json           `evaluate` records of one layer's SAEs; results.json holds them all
    publish/                   Gemma Scope layout: {site}/layer_{L}/width_{W}/average_l0_{N}/params.npz,
                               README.md (model card), eval_results.json
    report/index.html          Pareto fronts, metrics by layer, density histograms

Stages, in order: for each group of layers, `cache:G` -> `train:Lxx.site` for each of its (layer,
site) -> `eval:G`; then `publish` -> `report`. A stage is marked running in `suite.json` before it
starts and done after it ends; a rerun skips done stages and resumes the interrupted one through its
own resume (cache shards, training checkpoints, the results of each layer already evaluated), so a
killed suite finishes with the same SAEs and results as an uninterrupted one. `suite_status` reads
the same file, the training logs and the results written so far.

Under `torchrun` every rank runs the same stages in step: the cache and training stages are shared
out as `gemmascope cache` and `gemmascope train` share them; rank 0 alone writes `suite.json`,
measures the speeds, evaluates, publishes and draws the report while the others wait.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmascope import distributed
from gemmascope.activations import CacheConfig, build_cache, disk_free, site_dir
from gemmascope.distributed import on_main, resolve_device
from gemmascope.io._common import read_json
from gemmascope.io.atomic import write_json
from gemmascope.suite_plan import (
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
_RUNTIME = ("out", "device", "keep_cache", "disk_budget")
"""Config fields that may change between a run and its resume: they do not change the result."""


@dataclass
class SuiteConfig:
    """A `gemmascope suite` run: the grid of SAEs, how long to train them, and where the suite goes."""

    out: Path
    """Suite folder; rerunning the same command resumes it."""
    model: str = "gemma-3-270m"
    """Model name or local folder, as `models.load_model` takes it."""
    sites: list[str] = field(default_factory=lambda: ["resid_post"])
    """Sites within each layer (`resid_post`, `mlp_out`, `attn_z`, ...)."""
    layers: str = "all"
    """Layer spec: `all`, `0-17`, `3,6,9`."""
    widths: list[int] = field(default_factory=lambda: [16384])
    """SAE widths (latents)."""
    target_l0s: list[float] = field(default_factory=lambda: [50.0])
    """Target L0s: one JumpReLU SAE per width and target, trained in target-L0 mode."""
    tokens: int = 2_000_000
    """Activation vectors cached per (layer, site), and each SAE's training tokens (one epoch)."""
    train_tokens: int | None = None
    """Tokens each SAE trains on (default: `tokens`, one epoch); more loop over the cache in epochs."""
    eval_tokens: int = 20_000
    """Held-out tokens each SAE is evaluated on."""
    ablations: bool = True
    """Also run zero- and mean-ablation in evaluation (for the fraction of loss recovered)."""
    corpus: str = "default"
    """`default`, a .txt/.jsonl/.parquet file, folder or glob, or a Hugging Face dataset name."""
    text_column: str = "text"
    """Text field of .jsonl/.parquet/Hugging Face rows."""
    eval_fraction: float = 0.02
    """Share of documents held out for evaluation."""
    context_size: int = 1024
    """Tokens per sequence, BOS included."""
    model_batch_size: int = 8
    """Sequences per model forward (caching and evaluation)."""
    batch_size: int = 4096
    """Tokens per training step."""
    lr: float = 7e-5
    """Adam learning rate (Gemma Scope's; short runs want more, e.g. 2e-3)."""
    matmul_dtype: str = "float32"
    """Dense products in training: float32, bfloat16 or float16."""
    encoder_init_scale: float = 1.0
    """W_enc = scale * W_dec^T at init (the recipe's 1; 0.1 suits short runs)."""
    center: bool = False
    """Subtract each site's mean before training, folded back into the biases after (short runs)."""
    standardize: bool = False
    """Also divide each dimension by its standard deviation in training, folded back after."""
    cache_dtype: str = "float32"
    """Storage dtype of the activation cache: float32, bfloat16 or float16."""
    buffer_size: int = 1 << 19
    """Activation vectors shuffled together when training."""
    checkpoint_every: int = 200
    """Training steps between checkpoints: at most this much training is redone after a kill."""
    seed: int = 0
    """Seed of SAE init and data order."""
    saelens: bool = False
    """Also publish a SAELens-format copy."""
    base_model: str | None = None
    """Hub id for the model card (default: from the model name, e.g. google/gemma-3-270m)."""
    disk_budget: int | None = None
    """Bytes the suite may use on disk (default: the free space at `out`); caches go in groups of
    layers that fit it."""
    keep_cache: bool = False
    """Keep each group's activation cache instead of dropping it once its SAEs are trained."""
    device: str = "auto"
    """Where the model and the SAEs run: cpu, cuda, cuda:N, mps, or auto (the GPU if there is one)."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.sites or not self.widths or not self.target_l0s:
            raise ValueError("`sites`, `widths` and `target_l0s` each need at least one value")
        if self.train_tokens is None:
            self.train_tokens = self.tokens
        for name in (
            "tokens",
            "train_tokens",
            "eval_tokens",
            "batch_size",
            "model_batch_size",
            "context_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        if min(self.tokens, self.train_tokens) < self.batch_size:
            raise ValueError(
                f"`tokens`={self.tokens:,} or `train_tokens`={self.train_tokens:,} is less than one "
                "training batch (`batch_size`="
                f"{self.batch_size:,}); ask for more tokens or a smaller batch"
            )
        if self.cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"`cache_dtype` {self.cache_dtype!r}: choose float32, bfloat16 or float16"
            )
        if len(set(self.sites)) != len(self.sites) or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"`sites` {self.sites} or `widths` {self.widths} repeat a value")

    def train_config(self) -> Any:
        """The `TrainConfig` every (layer, site) of the suite trains with."""
        from gemmascope.train import TrainConfig

        return TrainConfig(
            tokens=self.train_tokens, batch_size=self.batch_size, lr=self.lr,
            matmul_dtype=self.matmul_dtype, encoder_init_scale=self.encoder_init_scale,  # type: ignore[arg-type]
            center=self.center, standardize=self.standardize,
            device=self.device, seed=self.seed, checkpoint_every=self.checkpoint_every,
            model=self.model, dataset=self.corpus, context_size=self.context_size,
        )  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """The fields that define the suite's result (a resume must match them)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUNTIME}


_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(SuiteConfig)
    if f.default is not dataclasses.MISSING
}


def results_file(out: Path, layer: int) -> Path:
    """Where the suite at `out` keeps the evaluation records of one layer's SAEs."""
    return out / "results" / f"L{layer:02d}.json"


def parse_bytes(text: str | int) -> int:
    """`50G`, `500M`, `1.5T`, `2GiB` or a plain byte count (k, M, G, T are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if m is None:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 500M, 50G or 1.5T")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def stage_names(plan: Plan) -> list[str]:
    """Every stage of a plan, in the order they run."""
    names: list[str] = []
    for g, layers in enumerate(plan.groups):
        names.append(f"cache:{g}")
        names += [f"train:{site_dir((layer, s))}" for layer in layers for s in plan.sites]
        names.append(f"eval:{g}")
    return [*names, "publish", "report"]


def build_suite(
    cfg: SuiteConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    dry_run: bool = False,
    progress: bool = True,
    echo: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Plan the suite (printing disk, memory and time first), then run or resume every stage.

    Args:
        cfg: the suite (see `SuiteConfig`).
        model, tokenizer: an already loaded model (tests); default `load_model(cfg.model)`.
        dry_run: measure and print the plan, write nothing.
        progress: progress bars on stderr.
        echo: receives the plan table and one line per stage (default: print to stderr).
    Returns:
        The suite manifest (`suite.json`), every stage done unless `dry_run`.
    """
    from gemmascope import models

    show = (echo or _stderr) if distributed.is_main() else _silent
    device = resolve_device(cfg.device)
    distributed.init(device)
    if model is None:
        model, tokenizer = models.load_model(cfg.model, device=device)
    elif tokenizer is None:
        raise ValueError("build_suite got a `model` but no `tokenizer`; pass both, or neither")
    cfg.train_config()  # its checks, before any work
    info = models.model_info(model)
    layers = models.parse_layers(cfg.layers, info.n_layers)
    for layer in layers:
        for site in cfg.sites:
            models.check_site(info, layer, site)

    def opened() -> dict[str, Any]:
        manifest = _open_manifest(cfg)
        if manifest is None:
            manifest = _new_manifest(cfg, model, tokenizer, info, layers)
            if not dry_run:
                write_json(cfg.out / "suite.json", manifest)
        return manifest

    manifest = on_main(opened)
    from gemmascope.suite_status import plan_table

    show(plan_table(manifest))
    if dry_run:
        return manifest
    _Stages(cfg, manifest, model, tokenizer, progress, show).run()
    return manifest


def _silent(item: Any) -> None:
    pass


def _stderr(item: Any) -> None:
    from rich.console import Console

    Console(stderr=True).print(item)


def _open_manifest(cfg: SuiteConfig) -> dict[str, Any] | None:
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
    theirs = {**{k: v for k, v in _DEFAULTS.items() if k in mine}, **theirs}
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


def read_manifest(out: str | Path) -> dict[str, Any]:
    """`suite.json` of the suite at `out`, checking its format."""
    file = Path(out) / "suite.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: not found; is {out} a suite made by `gemmascope suite`?")
    manifest = read_json(file)  # a damaged file gets an error naming it
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return manifest


def _new_manifest(
    cfg: SuiteConfig, model: Any, tokenizer: Any, info: Any, layers: list[int]
) -> dict[str, Any]:
    import torch

    free = disk_free(cfg.out)
    budget = cfg.disk_budget if cfg.disk_budget is not None else free
    if budget > free:
        raise ValueError(
            f"--disk-budget {fmt_bytes(budget)} is more than the {fmt_bytes(free)} free at "
            f"{cfg.out}; lower it or free some space"
        )
    itemsize = torch.empty(0, dtype=getattr(torch, cfg.cache_dtype)).element_size()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = plan_suite(
        info, layers, cfg.sites, cfg.widths, cfg.target_l0s,
        tokens=cfg.tokens, itemsize=itemsize, model_bytes=model_bytes,
        buffer_size=min(cfg.buffer_size, cfg.tokens), batch_size=cfg.batch_size, disk_budget=budget,
    )  # fmt: skip
    shapes = sorted({(d, w) for d in plan.site_widths.values() for w in cfg.widths})
    rates = measure_rates(
        model, info, shapes, target_l0=min(cfg.target_l0s), batch_size=cfg.batch_size,
        model_batch_size=cfg.model_batch_size, context_size=cfg.context_size,
        vocab_size=len(tokenizer),
    )  # fmt: skip
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": cfg.identity(),
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()
        },
        "disk_budget": budget,
        "plan": plan.to_dict(),
        "rates": dataclasses.asdict(rates),
        "estimates": stage_estimates(plan, rates, cfg),
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


class _Stages:
    """Runs the stages of one suite in order, recording each in `suite.json`."""

    def __init__(
        self, cfg: SuiteConfig, manifest: dict[str, Any], model: Any, tokenizer: Any,
        progress: bool, show: Callable[[Any], None],
    ) -> None:  # fmt: skip
        self.cfg, self.manifest, self.model, self.tokenizer = cfg, manifest, model, tokenizer
        self.progress, self.show = progress, show
        self.plan = plan_of(manifest)
        self.runs = cfg.out / "runs"

    def run(self) -> None:
        for g, layers in enumerate(self.plan.groups):
            keys = [(layer, s) for layer in layers for s in self.plan.sites]
            if not all(self._done(f"train:{site_dir(k)}") for k in keys):
                self._stage(f"cache:{g}", lambda g=g, layers=layers: self._cache(g, layers))
                for key in keys:
                    self._stage(f"train:{site_dir(key)}", lambda key=key, g=g: self._train(g, key))
            self._drop_cache(g)
            self._stage(f"eval:{g}", lambda layers=layers: on_main(lambda: self._evaluate(layers)))
        self._stage("publish", lambda: on_main(self._publish))
        self._stage("report", lambda: on_main(self._report))

    # --- bookkeeping
    def _done(self, name: str) -> bool:
        return self.manifest["stages"].get(name, {}).get("state") == "done"

    def _save(self) -> None:
        if distributed.is_main():
            write_json(self.cfg.out / "suite.json", self.manifest)

    def _stage(self, name: str, fn: Callable[[], None]) -> None:
        if self._done(name):
            return
        stages = self.manifest["stages"]
        before = stages.get(name, {})
        spent = float(before.get("seconds", 0.0))  # time of earlier, interrupted tries
        stages[name] = {"state": "running", "started": time.time(), "pid": os.getpid(),
                        "host": socket.gethostname(), "seconds": spent}  # fmt: skip
        self._save()
        self.show(f"[bold]{name}[/bold]" + (" (resuming)" if before else ""))
        t0 = time.perf_counter()
        try:
            fn()
        except BaseException as err:  # recorded for `suite status`, then re-raised
            stages[name].update(state="stopped", error=f"{type(err).__name__}: {err}",
                                seconds=spent + time.perf_counter() - t0)  # fmt: skip
            self._save()
            raise
        stages[name].update(state="done", seconds=spent + time.perf_counter() - t0,
                            finished=time.time())  # fmt: skip
        self._save()

    # --- the stages
    def _cache_dir(self, g: int) -> Path:
        return self.cfg.out / "cache" / f"group-{g:02d}"

    def _cache(self, g: int, layers: list[int]) -> None:
        c = self.cfg
        cache_cfg = CacheConfig(
            out=self._cache_dir(g), model=c.model, layers=",".join(map(str, layers)),
            sites=list(c.sites), tokens=c.tokens, corpus=c.corpus, text_column=c.text_column,
            eval_fraction=c.eval_fraction, context_size=c.context_size,
            batch_size=c.model_batch_size, dtype=c.cache_dtype, device=c.device,
        )  # fmt: skip
        build_cache(cache_cfg, model=self.model, tokenizer=self.tokenizer, progress=self.progress)

    def _specs(self, key: tuple[int, str]) -> list[Any]:
        from gemmascope.train import expand_sweep

        return expand_sweep([key[0]], [key[1]], self.cfg.widths, target_l0s=self.cfg.target_l0s)

    def _train(self, g: int, key: tuple[int, str]) -> None:
        from gemmascope.loader import CachedActivations
        from gemmascope.train import train

        c = self.cfg
        data = CachedActivations(self._cache_dir(g), key, batch_size=c.batch_size,
                                 buffer_size=c.buffer_size, seed=c.seed)  # fmt: skip
        run = self.runs / site_dir(key)
        train(self._specs(key), data.batches, c.train_config(), run, resume=True,
              progress=self.progress)  # fmt: skip
        # the SAEs are saved; free the disk
        on_main(lambda: shutil.rmtree(run / "checkpoint", ignore_errors=True))

    def _drop_cache(self, g: int) -> None:
        folder = self._cache_dir(g)
        if not self.cfg.keep_cache and folder.exists():
            on_main(lambda: shutil.rmtree(folder))
            self.show(f"dropped the cache of group {g} ({folder.name})")

    def _results(self, layer: int) -> Path:
        return results_file(self.cfg.out, layer)

    def _evaluate(self, layers: list[int]) -> None:
        """One layer at a time, each written when done: a resumed stage skips the layers it has."""
        for layer in layers:
            if not self._results(layer).exists():
                self._evaluate_layer(layer)

    def _evaluate_layer(self, layer: int) -> None:
        from gemmascope import io
        from gemmascope.evaluate import evaluate, write_results

        c = self.cfg
        keys = [(layer, s) for s in self.plan.sites]
        ids = [f"{site_dir(k)}/{s.name}" for k in keys for s in self._specs(k)]
        device = next(self.model.parameters()).device
        saes = [io.load(self.runs / sae_id, device=device) for sae_id in ids]
        self.show(f"evaluating the {len(saes)} SAEs of layer {layer}")
        records = evaluate(
            self.model, self.tokenizer, saes, corpus=c.corpus, split="eval", tokens=c.eval_tokens,
            context_size=c.context_size, batch_size=c.model_batch_size, text_column=c.text_column,
            eval_fraction=c.eval_fraction, ablations=c.ablations, model_name=c.model,
            progress=self.progress,
        )  # fmt: skip
        for record, sae_id in zip(records, ids, strict=True):
            record.update(source=str(self.runs.resolve()), sae_id=sae_id)
        settings = {k: getattr(c, k) for k in ("model", "corpus", "eval_tokens", "context_size")}
        write_results(self._results(layer), records, settings)

    def _publish(self) -> None:
        from gemmascope.evaluate import read_results, write_results
        from gemmascope.publish import publish

        c = self.cfg
        records = [r for layer in self.plan.layers for r in read_results(self._results(layer))]
        write_results(c.out / "results.json", records, {"suite": str(c.model)})
        publish(self.runs, c.out / "publish", results=c.out / "results.json", saelens=c.saelens,
                base_model=c.base_model, overwrite=True)  # fmt: skip

    def _report(self) -> None:
        from gemmascope.report import build_report

        build_report([self.cfg.out / "publish" / "eval_results.json"], self.cfg.out / "report",
                     title=f"SAE suite: {self.cfg.model}")  # fmt: skip
