"""One command builds a whole Gemma Scope-style suite: plan, cache, train, evaluate, publish, report.

Stages, in order: for each group of layers, `cache:G` -> `train:Lxx.site` for each of its (layer,
site) -> `index:G` (the feature index of each SAE, all from one forward) -> `eval:G` (whose
auto-interpretation, if asked for, stores its explanations in those indexes); then `publish` ->
`report`. A stage is marked running in `suite.json` before it
starts and done after it ends; a rerun skips done stages and resumes the interrupted one through its
own resume (cache shards, training checkpoints, the results of each layer already evaluated), so a
killed suite finishes with the same SAEs and results as an uninterrupted one. `suite.status` reads
the same file, the training logs and the results written so far.

Under `torchrun` every rank runs the same stages in step: the cache and training stages are shared
out as `gemmascope cache` and `gemmascope train` share them; rank 0 alone writes `suite.json`,
measures the speeds, evaluates, publishes and draws the report while the others wait.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemmascope.activations import build_cache, site_dir
from gemmascope.common import distributed
from gemmascope.common.config import flat
from gemmascope.common.devices import resolve_device
from gemmascope.common.distributed import on_main
from gemmascope.common.files import write_json
from gemmascope.suite.config import SuiteConfig
from gemmascope.suite.manifest import (
    cache_dir,
    new_manifest,
    open_manifest,
    plan_of,
    results_file,
    run_dir,
)
from gemmascope.suite.status import plan_table


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
    model, tokenizer = models.given_or_loaded(cfg.model, model, tokenizer, device=device,
                                              caller="build_suite")  # fmt: skip
    info = models.model_info(model)
    layers = models.parse_layers(cfg.layers, info.n_layers)
    for layer in layers:
        for site in cfg.sites:
            models.check_site(info, layer, site)

    def opened() -> dict[str, Any]:
        manifest = open_manifest(cfg)
        if manifest is None:
            manifest = new_manifest(cfg, model, tokenizer, info, layers)
            if not dry_run:
                write_json(cfg.out / "suite.json", manifest)
        return manifest

    manifest = on_main(opened)
    show(plan_table(manifest))
    if dry_run:
        return manifest
    _check_memory(plan_of(manifest))
    _Stages(cfg, manifest, model, tokenizer, progress, show).run()
    return manifest


def _check_memory(plan: Any) -> None:
    """Refuse a suite whose peak memory (the plan's) is more than this machine has free."""
    from gemmascope.models import available_memory
    from gemmascope.train.memory import resident_bytes

    have = available_memory() + resident_bytes()  # the model is loaded and counted already
    if plan.peak_memory > have:
        raise ValueError(
            f"the suite needs about {plan.peak_memory / 2**30:,.1f} GiB of memory at its peak (the "
            f"model, one (layer, site)'s SAEs with their Adam state and step buffers, the loader's "
            f"buffers) but {have / 2**30:,.1f} GiB is free; train fewer --widths or --target-l0 "
            "per suite, a smaller --batch-size or --buffer-size"
        )


def _silent(item: Any) -> None:
    pass


def _stderr(item: Any) -> None:
    from rich.console import Console

    Console(stderr=True).print(item)


class _Stages:
    """Runs the stages of one suite in order, recording each in `suite.json`."""

    def __init__(
        self, cfg: SuiteConfig, manifest: dict[str, Any], model: Any, tokenizer: Any,
        progress: bool, show: Callable[[Any], None],
    ) -> None:  # fmt: skip
        self.cfg, self.manifest, self.model, self.tokenizer = cfg, manifest, model, tokenizer
        self.progress, self.show = progress, show
        self.plan = plan_of(manifest)
        self.runs = cfg.out / "runs"  # run_dir(out, key) is one (layer, site) in it

    def run(self) -> None:
        for g, layers in enumerate(self.plan.groups):
            keys = [(layer, s) for layer in layers for s in self.plan.sites]
            if not all(self._done(f"train:{site_dir(k)}") for k in keys):
                self._stage(f"cache:{g}", lambda g=g, layers=layers: self._cache(g, layers))
                for key in keys:
                    self._stage(f"train:{site_dir(key)}", lambda key=key, g=g: self._train(g, key))
            self._drop_cache(g)
            self._stage(f"index:{g}", lambda layers=layers: on_main(lambda: self._index(layers)))
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
    def _cache(self, g: int, layers: list[int]) -> None:
        cache_cfg = dataclasses.replace(self.cfg.cache, out=cache_dir(self.cfg.out, g),
                                        layers=",".join(map(str, layers)), sites=list(self.cfg.sites))  # fmt: skip
        build_cache(cache_cfg, model=self.model, tokenizer=self.tokenizer, progress=self.progress)

    def _specs(self, key: tuple[int, str]) -> list[Any]:
        from gemmascope.train import expand_sweep

        return expand_sweep([key[0]], [key[1]], self.cfg.widths, target_l0s=self.cfg.target_l0s)

    def _train(self, g: int, key: tuple[int, str]) -> None:
        from gemmascope.activations import CachedActivations
        from gemmascope.train import train

        c = self.cfg
        data = CachedActivations(cache_dir(c.out, g), key, batch_size=c.train.batch_size,
                                 buffer_size=c.buffer_size, seed=c.seed)  # fmt: skip
        run = run_dir(c.out, key)
        train(self._specs(key), data.batches, c.train, run, resume=True, progress=self.progress)
        # the SAEs are saved; free the disk
        on_main(lambda: shutil.rmtree(run / "checkpoint", ignore_errors=True))

    def _drop_cache(self, g: int) -> None:
        folder = cache_dir(self.cfg.out, g)
        if not self.cfg.keep_cache and folder.exists():
            on_main(lambda: shutil.rmtree(folder))
            self.show(f"dropped the cache of group {g} ({folder.name})")

    def _sae_ids(self, layers: list[int]) -> list[str]:
        """`L03.resid_post/NAME` of every SAE of `layers`, as `runs/` holds them."""
        keys = [(layer, s) for layer in layers for s in self.plan.sites]
        return [f"{site_dir(k)}/{s.name}" for k in keys for s in self._specs(k)]

    def _index(self, layers: list[int]) -> None:
        """Every SAE of the group indexed from one forward per chunk; each index resumes alone."""
        from gemmascope.explore.catalog import suite_index
        from gemmascope.explore.index import build_indexes

        cfgs = [dataclasses.replace(self.cfg.index, sae_source=str(self.runs / sae_id),
                                    out=suite_index(self.cfg.out, sae_id))
                for sae_id in self._sae_ids(layers)]  # fmt: skip
        for c in cfgs:
            c.out.parent.mkdir(parents=True, exist_ok=True)
        build_indexes(cfgs, model=self.model, tokenizer=self.tokenizer, progress=self.progress)

    def _results(self, layer: int) -> Path:
        return results_file(self.cfg.out, layer)

    def _evaluate(self, layers: list[int]) -> None:
        """One layer at a time, each written when done: a resumed stage skips the layers it has."""
        for layer in layers:
            if not self._results(layer).exists():
                self._evaluate_layer(layer)

    def _evaluate_layer(self, layer: int) -> None:
        from gemmascope import io
        from gemmascope.evaluate import evaluate, write_results, write_saebench

        c = self.cfg
        ids = self._sae_ids([layer])
        device = next(self.model.parameters()).device
        saes = [io.load(self.runs / sae_id, device=device) for sae_id in ids]
        self.show(f"evaluating the {len(saes)} SAEs of layer {layer}")
        records = evaluate(self.model, self.tokenizer, saes, cfg=c.eval, progress=self.progress,
                           details=True)  # fmt: skip
        for record, sae_id in zip(records, ids, strict=True):
            record.update(source=str(self.runs.resolve()), sae_id=sae_id)
        settings = {"model": c.model, "corpus": c.corpus, "eval_tokens": c.eval.tokens,
                    "context_size": c.context_size}  # fmt: skip
        # SAEBench's files first: the results file, written last, marks the layer done
        cfgs = [sae.cfg.to_dict() for sae in saes for _ in range(sae.cfg.n_layers or 1)]
        write_saebench(c.out / "eval_results", records, {**flat(c.eval), **settings}, cfgs)
        for record in records:
            del record["saebench_details"]
        if "autointerp" in c.eval.evals:
            self._store_explanations(records, ids)
        write_results(self._results(layer), records, settings)

    def _store_explanations(self, records: list[dict[str, Any]], ids: list[str]) -> None:
        """Auto-interpretation's explanations into each SAE's index, for the explorer."""
        from gemmascope.evaluate.explanations import store_explanations
        from gemmascope.explore.catalog import suite_index

        for record, sae_id in zip(records, ids, strict=True):
            found = record["saebench"]["autointerp"]
            store_explanations(suite_index(self.cfg.out, sae_id), found["details"],
                               found["explainer"])  # fmt: skip

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
