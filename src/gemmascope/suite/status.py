"""What a suite plans and where it stands: the plan table and `gemmascope suite status`.

Both read `suite.json` (see `gemmascope.suite`); the status also reads each cache's manifest and each
training run's `metrics.jsonl` for the progress of unfinished stages. The ETA is the estimate of what
is left, scaled by how long finished stages took against their own estimates.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from gemmascope.activations import site_dir
from gemmascope.suite.manifest import config_view, plan_of, read_manifest, results_file, stage_names
from gemmascope.suite.plan import (
    H100_BF16,
    H100_FP32,
    flop_estimate,
    fmt_bytes,
    fmt_seconds,
)


def plan_table(manifest: dict[str, Any]) -> Table:
    """The plan as a two-column table: grid, disk, memory, measured speeds and time estimates."""

    plan, cfg, rates = plan_of(manifest), config_view(manifest), manifest["rates"]
    est = manifest["estimates"]
    t = Table("", "", title=f"suite plan: {cfg.model} -> {cfg.out}", show_header=False)
    t.add_row("SAEs", f"{len(plan.layers)} layers x {len(plan.sites)} sites "
              f"({', '.join(plan.sites)}) x {len(plan.widths)} widths x {len(plan.target_l0s)} "
              f"target L0s = {plan.n_saes}")  # fmt: skip
    t.add_row("tokens", f"{cfg.tokens:,} cached per (layer, site), {cfg.train_tokens:,} trained on "
              f"per SAE; {cfg.eval_tokens:,} held out for evaluation")  # fmt: skip
    t.add_row("cache", f"{fmt_bytes(plan.cache_bytes_per_layer)} per layer ({cfg.cache_dtype}); "
              f"{len(plan.groups)} group(s) of up to {max(map(len, plan.groups))} layers")  # fmt: skip
    t.add_row("disk", f"peak {fmt_bytes(plan.peak_disk)} of the {fmt_bytes(manifest['disk_budget'])} "
              f"budget; SAEs {fmt_bytes(plan.sae_bytes)}, published copies as much again")  # fmt: skip
    t.add_row("memory", f"about {fmt_bytes(plan.peak_memory)} (model, one (layer, site)'s SAEs in "
              "training, shuffle buffers)")  # fmt: skip
    speeds = ", ".join(f"{k} {v:,.0f}/{rates['train_sparse'][k]:,.0f}"
                       for k, v in rates["train_dense"].items())  # fmt: skip
    t.add_row(f"measured on {rates['device']}", f"forward {rates['body']:,.0f} tok/s, with logits "
              f"{rates['lm']:,.0f} tok/s; one SAE step d_in x width, dense/sparse tok/s: {speeds}")  # fmt: skip
    kinds = {
        k: sum(v for s, v in est.items() if s.startswith(k))
        for k in ("cache", "train", "index", "eval")
    }
    t.add_row("time here", f"{fmt_seconds(sum(kinds.values()))}: "
              + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in kinds.items()))  # fmt: skip
    if "flops" in manifest:
        for acc in (H100_FP32, H100_BF16):
            f = flop_estimate(plan, cfg, manifest["flops"]["layer"], manifest["flops"]["head"], acc)
            t.add_row(f"time on {acc.name}", f"{fmt_seconds(sum(f.values()))}: " + ", ".join(
                f"{k} {fmt_seconds(v)}" for k, v in f.items()) + f" (FLOPs at {acc.efficiency:.0%} "
                f"of {acc.matmul_flops / 1e12:,.0f} TFLOP/s, disk {acc.disk_bytes_per_s / 1e9:g} GB/s)")  # fmt: skip
    return t


def suite_status(out: str | Path) -> dict[str, Any]:
    """Each stage's state (`done`, `running`, `stopped`, `left`), progress and the ETA.

    Args:
        out: the suite folder.
    Returns:
        `{"stages": {name: {"state", "progress", "seconds", "estimate_s"}}, "done", "running",
        "left", "elapsed_s", "eta_s"}`; stages in the order they run.
    """

    out = Path(out)
    manifest = read_manifest(out)
    plan, cfg = plan_of(manifest), manifest["config"]
    stages: dict[str, dict[str, Any]] = {}
    for name in stage_names(plan):
        rec = manifest["stages"].get(name, {})
        state = rec.get("state", "left")
        if state == "running" and not _alive(rec):
            state = "stopped"
        progress = (
            1.0 if state == "done" else _progress(out, name, cfg, plan) if state != "left" else 0.0
        )
        stages[name] = {"state": state, "progress": progress, "seconds": rec.get("seconds", 0.0),
                        "estimate_s": manifest["estimates"].get(name, 0.0),
                        "error": rec.get("error")}  # fmt: skip
    finished = [s for s in stages.values() if s["state"] == "done" and s["estimate_s"] > 0]
    est_done = sum(s["estimate_s"] for s in finished)
    factor = sum(s["seconds"] for s in finished) / est_done if est_done > 0 else 1.0
    left = sum(
        s["estimate_s"] * (1 - s["progress"]) for s in stages.values() if s["state"] != "done"
    )
    by_state = {k: [n for n, s in stages.items() if s["state"] == k]
                for k in ("done", "running", "stopped", "left")}  # fmt: skip
    return {"stages": stages, **by_state, "elapsed_s": sum(s["seconds"] for s in stages.values()),
            "eta_s": left * min(max(factor, 0.2), 5.0),
            "throughput": _throughput(stages, plan, cfg)}  # fmt: skip


def _throughput(
    stages: dict[str, dict[str, Any]], plan: Any, cfg: dict[str, Any]
) -> dict[str, float]:
    """Measured speed of each stage kind over its finished stages: `cache` tokens/s (every site of
    a group at once), `train` SAE token-steps/s (all SAEs of a (layer, site) together), `eval` tokens/s
    per SAE (its share of the clean, spliced and ablated forwards)."""
    per_key = len(plan.widths) * len(plan.target_l0s)
    out: dict[str, float] = {}
    for kind in ("cache", "train", "index", "eval"):
        done = [n for n, s in stages.items() if n.startswith(kind + ":") and s["state"] == "done"]
        seconds = sum(stages[n]["seconds"] for n in done)
        if not done or seconds <= 0:
            continue
        if kind == "cache":
            total = cfg["tokens"] * len(done)
        elif kind == "train":
            total = _train_tokens(cfg) * per_key * len(done)
        elif kind == "index":
            layers = sum(len(plan.groups[int(n.partition(":")[2])]) for n in done)
            total = _index_tokens(cfg) * layers * len(plan.sites) * per_key
        else:
            layers = sum(len(plan.groups[int(n.partition(":")[2])]) for n in done)
            total = cfg["eval_tokens"] * layers * len(plan.sites) * per_key
        out[kind] = total / seconds
    return out


def _train_tokens(cfg: dict[str, Any]) -> int:
    """Tokens each SAE trains on (suites made before `train_tokens` trained on `tokens`)."""
    return cfg.get("train_tokens") or cfg["tokens"]


def _index_tokens(cfg: dict[str, Any]) -> int:
    """Tokens each SAE is indexed on (a suite made before the index stage has the default)."""
    from gemmascope.suite.config import identity_defaults

    return cfg.get("index_tokens") or identity_defaults()["index_tokens"]


def _alive(rec: dict[str, Any]) -> bool:
    if rec.get("host", socket.gethostname()) != socket.gethostname():
        return True  # another machine's process: cannot tell, trust the record
    try:
        os.kill(int(rec.get("pid", -1)), 0)
    except (OSError, ValueError):
        return False
    return True


def _progress(out: Path, name: str, cfg: dict[str, Any], plan: Any) -> float:
    """Share of an unfinished stage done, from the files it writes (0 where they say nothing)."""

    kind, _, what = name.partition(":")
    try:
        if kind == "cache":
            m = json.loads((out / "cache" / f"group-{int(what):02d}" / "manifest.json").read_text())
            return sum(s["tokens"] for s in m["shards"]) / cfg["tokens"]
        if kind == "train":
            log = out / "runs" / what / "metrics.jsonl"
            steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line]
            return max(steps, default=0) / (_train_tokens(cfg) // cfg["batch_size"])
        if kind == "index":
            layers = plan.groups[int(what)]
            keys = [site_dir((x, s)) for x in layers for s in plan.sites]
            written = sum(len(list((out / "index" / k).glob("*.sqlite"))) for k in keys)
            return written / (len(keys) * len(plan.widths) * len(plan.target_l0s))
        if kind == "eval":
            layers = plan.groups[int(what)]
            return sum(results_file(out, x).exists() for x in layers) / len(layers)
    except (OSError, ValueError, KeyError):
        pass
    return 0.0


def status_table(out: str | Path) -> Group:
    """`gemmascope suite status`: one row per (layer, site), the last stages, then counts and ETA."""

    out = Path(out)
    manifest, st = read_manifest(out), suite_status(out)
    plan, stages = plan_of(manifest), st["stages"]
    t = Table(
        "layer",
        "site",
        "cache",
        "train",
        "index",
        "eval",
        title=f"suite {out.name}: {plan.n_saes} SAEs",
    )
    for g, layers in enumerate(plan.groups):
        cache = _cell(stages[f"cache:{g}"])
        if cache == "done" and not (out / "cache" / f"group-{g:02d}").exists():
            cache = "done, dropped"
        for layer in layers:
            for site in plan.sites:
                train = stages[f"train:{site_dir((layer, site))}"]
                t.add_row(str(layer), site, cache, _cell(train), _cell(stages[f"index:{g}"]),
                          _cell(stages[f"eval:{g}"]))  # fmt: skip
    t.add_row("", "publish", "", "", "", _cell(stages["publish"]))
    t.add_row("", "report", "", "", "", _cell(stages["report"]))
    n = len(stages)
    summary = (f"{len(st['done'])} of {n} stages done, {len(st['running'])} running, "
               f"{len(st['stopped'])} stopped, {len(st['left'])} left; {fmt_seconds(st['elapsed_s'])} "
               f"spent, ETA {fmt_seconds(st['eta_s'])}")  # fmt: skip
    units = {"cache": "tok/s", "train": "SAE token-steps/s", "index": "tok/s per SAE",
             "eval": "tok/s per SAE"}  # fmt: skip
    if st["throughput"]:
        summary += "\nmeasured: " + ", ".join(
            f"{k} {v:,.0f} {units[k]}" for k, v in st["throughput"].items()
        )
    if st["stopped"] and not st["running"]:
        summary += "\nstopped: rerun the same `gemmascope suite` command to resume"
    errors = [
        f"{n}: {s['error']}" for n, s in stages.items() if s.get("error") and s["state"] != "done"
    ]
    return Group(t, summary, *errors)


def _cell(stage: dict[str, Any]) -> str:
    state = stage["state"]
    if state in ("running", "stopped") and 0 < stage["progress"] < 1:
        return f"{state} {stage['progress']:.0%}"
    return state
