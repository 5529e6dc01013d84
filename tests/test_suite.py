"""The suite command: a small suite end to end, kill and resume, the status view, the CLI, errors."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import gemmascope
from gemmascope.activations import CacheConfig
from gemmascope.cli import app
from gemmascope.evaluate import EvalConfig, read_results
from gemmascope.explore.index import IndexConfig
from gemmascope.models import load_model
from gemmascope.suite import (
    SuiteConfig,
    build_suite,
    read_manifest,
    stage_names,
    status_table,
    suite_status,
)
from gemmascope.train import TrainConfig

# 2 layers x 2 sites x 1 width x 2 target L0s = 8 SAEs on 4,096 tokens; the disk budget holds one
# layer's cache (1.1 MB) at a time, so the layers go in two groups and each cache is dropped.
FLAGS = dict(sites="resid_post,attn_z", layers="0-1", widths="64", l0="2,24", tokens="4096",
             eval_tokens="256", eval_fraction="0.2", context_size="16", model_batch_size="4",
             batch_size="128", lr="1e-2", checkpoint_every="8", base_model="test/tiny-saes",
             disk_budget="2000000", index_tokens="1024")  # fmt: skip
KEYS = ["L00.resid_post", "L00.attn_z", "L01.resid_post", "L01.attn_z"]


def _args(out: Path, model: Path, corpus: Path, **over: str) -> list[str]:
    flags = {**FLAGS, "model": str(model), "corpus": str(corpus), "out": str(out), **over}
    return ["suite", *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", v)]]


def _config(out: Path, model: Path, corpus: Path) -> SuiteConfig:
    """The same suite as `_args`, as a config."""
    f = FLAGS
    return SuiteConfig(
        out=out, model=str(model), sites=f["sites"].split(","), layers=f["layers"], widths=[64],
        target_l0s=[2.0, 24.0], cache=CacheConfig(tokens=4096), eval=EvalConfig(tokens=256),
        corpus=str(corpus), eval_fraction=0.2, context_size=16, model_batch_size=4,
        train=TrainConfig(batch_size=128, lr=1e-2, checkpoint_every=8),
        base_model=f["base_model"], disk_budget=2_000_000, index=IndexConfig(tokens=1024),
    )  # fmt: skip


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path, corpus: Path) -> Path:
    """An uninterrupted suite, built through the command line."""
    out = tmp_path_factory.mktemp("suite") / "full"
    result = CliRunner().invoke(app, _args(out, tiny_folder, corpus))
    assert result.exit_code == 0, result.output
    assert "suite plan" in result.output and "suite complete" in result.output
    return out


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    folders = sorted(p.parent for p in (out / "runs").rglob("cfg.json"))
    return {f"{p.parent.name}/{p.name}": gemmascope.load(p).state_arrays() for p in folders}


def test_end_to_end_layout_card_report_and_every_sae_loads(full: Path) -> None:
    manifest = read_manifest(full)
    assert manifest["plan"]["groups"] == [[0], [1]]
    assert all(manifest["stages"][n]["state"] == "done" for n in stage_names_of(manifest))
    assert not list((full / "cache").glob("group-*"))  # dropped once trained
    assert not list((full / "runs").rglob("checkpoint"))
    card = (full / "publish" / "README.md").read_text()
    assert "base_model: test/tiny-saes" in card and str(full) not in card
    assert (full / "report" / "index.html").exists()
    published = read_results(full / "publish" / "eval_results.json")
    assert len(published) == 8 and {r["source"] for r in published} == {"resid_post", "attn_z"}
    assert (
        len(list((full / "eval_results" / "core").glob("*_eval_results.json"))) == 8
    )  # SAEBench's
    assert all(
        "kl_div_score" in r["saebench"]["core"]["model_behavior_preservation"] for r in published
    )
    x = torch.randn(32, 32)
    weights = _weights(full)
    assert len(weights) == 8
    for r in published:
        sae = gemmascope.load(full / "publish" / r["source"], sae_id=r["sae_id"])
        assert r["sae_id"].startswith(f"layer_{r['layer']}/width_64/average_l0_")
        key = f"L{r['layer']:02d}.{r['site']}/layer_{r['layer']}_{r['site']}_w64_jumprelu_l0_"
        original = [gemmascope.load(full / "runs" / k) for k in weights if k.startswith(key)]
        assert any(torch.equal(sae.encode(x), o.encode(x)) or torch.allclose(
            sae.encode(x), o.encode(x), atol=1e-5) for o in original)  # fmt: skip
    indexes = sorted((full / "index").rglob("*.sqlite"))
    assert [p.relative_to(full / "index").parent.name for p in indexes] == sorted(
        f"{k}" for k in KEYS for _ in range(2))  # fmt: skip
    from fastapi.testclient import TestClient

    from gemmascope.explore.app import create_app

    client = TestClient(create_app(full), base_url="http://127.0.0.1")
    saes = client.get("/api/saes").json()["saes"]
    assert len(saes) == 8 and all("l0" in s["metrics"] for s in saes)  # evaluated: metrics shown
    first = saes[0]["key"]
    assert client.get(f"/api/sae/{first}/features/0").status_code == 200
    low, high = (sorted(r["l0"] for r in published if r["layer"] == 0 and r["site"] == s)
                 for s in ("resid_post", "attn_z"))  # fmt: skip
    assert low[0] < low[1] and high[0] < high[1]  # target 2 sparser than target 24


def stage_names_of(manifest: dict[str, Any]) -> list[str]:
    from gemmascope.suite import plan_of

    return stage_names(plan_of(manifest))


class Killed(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(
    tmp_path: Path, full: Path, tiny_folder: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gemmascope.report as report_mod
    import gemmascope.suite.stages as suite_mod
    import gemmascope.train as train_mod

    model, tok = load_model(str(tiny_folder))
    real_train, real_cache = train_mod.train, suite_mod.build_cache
    trained: list[str] = []
    cached: list[str] = []

    def dying_train(specs: Any, batches: Any, cfg: Any, out: Path, **kw: Any) -> Any:
        trained.append(out.name)

        def dying(start: int) -> Any:
            for i, b in enumerate(batches(start)):
                if out.name == "L01.resid_post" and start == 0 and i == 20:  # checkpoint at 16
                    raise Killed
                yield b

        return real_train(specs, dying, cfg, out, **kw)

    def counting_cache(cfg: Any, **kw: Any) -> Any:
        cached.append(cfg.out.name)
        return real_cache(cfg, **kw)

    def quick_report(results: Any, out: Path, **kw: Any) -> Path:  # matplotlib is the slow part
        out.mkdir(parents=True, exist_ok=True)
        (out / "index.html").write_text("report")
        return out / "index.html"

    monkeypatch.setattr(train_mod, "train", dying_train)
    monkeypatch.setattr(suite_mod, "build_cache", counting_cache)
    monkeypatch.setattr(report_mod, "build_report", quick_report)
    out = tmp_path / "cut"
    with pytest.raises(Killed):
        build_suite(_config(out, tiny_folder, corpus), model=model, tokenizer=tok, progress=False,
                    echo=lambda _: None)  # fmt: skip
    assert trained == KEYS[:3] and cached == ["group-00", "group-01"]
    status = suite_status(out)
    assert status["stopped"] == ["train:L01.resid_post"]
    assert status["done"] == ["cache:0", "train:L00.resid_post", "train:L00.attn_z", "index:0",
                              "eval:0", "cache:1"]  # fmt: skip
    assert status["stages"]["train:L01.resid_post"]["progress"] == pytest.approx(20 / 32)
    assert status["eta_s"] > 0
    result = CliRunner().invoke(app, ["suite", "status", str(out)])
    assert result.exit_code == 0, result.output
    assert "stopped 62%" in result.output and "rerun the same" in result.output
    finished = {p: p.stat().st_mtime_ns for p in (out / "runs" / "L00.resid_post").rglob("*")}

    trained.clear()
    cached.clear()
    build_suite(_config(out, tiny_folder, corpus), model=model, tokenizer=tok, progress=False,
                echo=lambda _: None)  # fmt: skip
    assert trained == KEYS[2:] and cached == []  # finished stages were not redone
    assert finished == {
        p: p.stat().st_mtime_ns for p in (out / "runs" / "L00.resid_post").rglob("*")
    }
    assert suite_status(out)["left"] == [] and suite_status(out)["eta_s"] == 0
    want, got = _weights(full), _weights(out)
    assert sorted(want) == sorted(got)
    for name, arrays in want.items():
        for k, v in arrays.items():
            assert torch.equal(got[name][k], v), f"{name} {k}"
    strip = ("source",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in read_results(out / "results.json")] == [
        {k: v for k, v in r.items() if k not in strip} for r in read_results(full / "results.json")
    ]  # fmt: skip


def test_a_killed_evaluation_resumes_at_the_layer_it_stopped(
    tmp_path: Path, tiny_folder: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gemmascope.evaluate as evaluate_mod

    model, tok = load_model(str(tiny_folder))
    cfg = dataclasses.replace(
        _config(tmp_path / "s", tiny_folder, corpus), sites=["resid_post"], target_l0s=[24.0],
        disk_budget=None,
    )  # fmt: skip
    real = evaluate_mod.evaluate
    layers: list[int] = []

    def dies_on_layer_1(model: Any, tokenizer: Any, saes: Any, **kw: Any) -> Any:
        layers.append(saes[0].cfg.layer)
        if saes[0].cfg.layer == 1 and len(layers) == 2:
            raise Killed
        return real(model, tokenizer, saes, **kw)

    monkeypatch.setattr(evaluate_mod, "evaluate", dies_on_layer_1)
    with pytest.raises(Killed):
        build_suite(cfg, model=model, tokenizer=tok, progress=False, echo=lambda _: None)
    assert layers == [0, 1] and read_manifest(cfg.out)["plan"]["groups"] == [[0, 1]]
    status = suite_status(cfg.out)
    assert status["stopped"] == ["eval:0"] and status["stages"]["eval:0"]["progress"] == 0.5
    first = (cfg.out / "results" / "L00.json").read_bytes()
    build_suite(cfg, model=model, tokenizer=tok, progress=False, echo=lambda _: None)
    assert layers == [0, 1, 1]  # layer 0 was not evaluated again
    assert (cfg.out / "results" / "L00.json").read_bytes() == first
    records = read_results(cfg.out / "results.json")
    assert [(r["layer"], r["site"]) for r in records] == [(0, "resid_post"), (1, "resid_post")]


def test_status_of_a_finished_and_a_running_suite(full: Path, tmp_path: Path) -> None:
    st = suite_status(full)
    assert st["left"] == [] and st["running"] == [] and len(st["done"]) == 12 and st["eta_s"] == 0
    result = CliRunner().invoke(app, ["suite", "status", str(full)])
    assert result.exit_code == 0, result.output
    assert "12 of 12 stages done" in result.output and "done, dropped" in result.output
    assert set(st["throughput"]) == {"cache", "train", "index", "eval"}
    assert all(v > 0 for v in st["throughput"].values())
    assert "measured: cache" in result.output and "SAE token-steps/s" in result.output
    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = read_manifest(full)
    for name in ("eval:1", "publish", "report"):
        del manifest["stages"][name]
    manifest["stages"]["eval:1"] = {"state": "running", "pid": os.getpid(), "seconds": 1.0}
    (copy / "suite.json").write_text(json.dumps(manifest))
    st = suite_status(copy)
    assert st["running"] == ["eval:1"] and st["left"] == ["publish", "report"]
    assert st["eta_s"] > 0
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(status_table(copy))
    assert "running" in console.export_text()


def test_cli_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, tiny_folder: Path, corpus: Path
) -> None:
    out = tmp_path / "dry"
    result = CliRunner().invoke(app, [*_args(out, tiny_folder, corpus), "--dry-run"])
    assert result.exit_code == 0, result.output
    for word in ("suite plan", "8", "peak", "memory", "tok/s", "time here", "H100"):
        assert word in result.output, word
    assert not out.exists()


def test_rerunning_a_finished_suite_does_nothing(
    full: Path, tiny_folder: Path, corpus: Path
) -> None:
    before = (full / "suite.json").read_text()
    result = CliRunner().invoke(app, _args(full, tiny_folder, corpus))
    assert result.exit_code == 0, result.output
    assert "suite complete" in result.output and (full / "suite.json").read_text() == before


def test_clear_errors(tmp_path: Path, full: Path, tiny_folder: Path, corpus: Path) -> None:
    cases = [
        (dict(sites="resid_post,bogus"), "unknown `sites` 'bogus'"),
        (dict(layers="0-7"), "layer 7 in '0-7' is out of range; this model has layers 0..2"),
        (dict(disk_budget="500k"), "holds no layer's cache"),
        (dict(tokens="100"), "less than one training batch"),
        (dict(train_tokens="100"), "less than one training batch"),
        (dict(widths="64,64"), "repeat a value"),
    ]
    for over, message in cases:
        result = CliRunner().invoke(app, _args(tmp_path / "e", tiny_folder, corpus, **over))
        assert result.exit_code == 2 and message in result.output, (over, result.output)
        assert not (tmp_path / "e").exists()
    changed = CliRunner().invoke(app, _args(full, tiny_folder, corpus, tokens="8192"))
    assert changed.exit_code == 2 and "written by a different command (tokens: suite has 4096" in (
        changed.output
    )
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    busy = CliRunner().invoke(app, _args(tmp_path / "busy", tiny_folder, corpus))
    assert busy.exit_code == 2 and "holds no suite.json" in busy.output
    missing = CliRunner().invoke(app, ["suite", "status", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not found" in missing.output
    assert CliRunner().invoke(app, ["suite"]).exit_code == 2


def test_train_tokens_and_center_reach_the_trainer(tmp_path: Path) -> None:
    """`--train-tokens` loops over the cache in epochs; `--center` is the trainer's option."""
    four_k = CacheConfig(tokens=4096)
    one = SuiteConfig(out=tmp_path, cache=four_k, train=TrainConfig(batch_size=128)).train_config()
    assert one.tokens == 4096 and not one.center
    more = SuiteConfig(out=tmp_path, cache=four_k, train_tokens=12288,
                       train=TrainConfig(center=True, batch_size=128))  # fmt: skip
    assert more.train_config().tokens == 12288 and more.train_config().center
    assert more.identity()["train_tokens"] == 12288 and more.identity()["center"]
    std = SuiteConfig(
        out=tmp_path, cache=four_k, train=TrainConfig(standardize=True, batch_size=128)
    )
    assert std.train_config().standardize and std.identity()["standardize"]


def test_a_suite_made_before_a_config_field_existed_resumes(
    tmp_path: Path, full: Path, tiny_folder: Path, corpus: Path
) -> None:
    from gemmascope.suite.manifest import open_manifest

    old = read_manifest(full)
    del old["identity"]["standardize"]  # as a suite.json from before --standardize: off then
    copy = tmp_path / "old"
    copy.mkdir()
    (copy / "suite.json").write_text(json.dumps(old))
    cfg = dataclasses.replace(_config(full, tiny_folder, corpus), out=copy)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, standardize=False))
    assert open_manifest(cfg) == old
    with pytest.raises(ValueError, match="standardize: suite has False, this run True"):
        open_manifest(
            dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, standardize=True))
        )


def test_the_plan_counts_absorption_and_sparse_probing() -> None:
    from types import SimpleNamespace

    from gemmascope.evaluate.absorption import PROBE_SECONDS_PER_LATENT
    from gemmascope.evaluate.spelling import TOKENS_PER_WORD
    from gemmascope.suite.plan import Rates, _extra_eval_seconds

    plan = SimpleNamespace(
        widths=[1000, 3000], target_l0s=[20, 50], sites=["resid_post"], n_layers=4
    )
    rates = Rates(device="cpu", body=1000.0, lm=100.0)
    cfg = SimpleNamespace(eval_evals=["core", "absorption", "sparse_probing"],
                          eval_absorption_words=1100, eval_probe_tasks=["a", "b"],
                          eval_probe_train=10, eval_probe_test=5, eval_probe_context=100)  # fmt: skip
    tokens = 1100 * TOKENS_PER_WORD + 2 * 15 * 100  # prompts and windows
    probes = PROBE_SECONDS_PER_LATENT * 1100 / 20_000 * 2000 * 4  # 4 SAEs of mean width 2,000
    layers = [1, 3]  # forwards stop at each layer: 2/4 and 4/4 of the model
    want = tokens / 1000 * (2 / 4 + 4 / 4) + 2 * probes
    assert _extra_eval_seconds(plan, layers, rates, cfg) == pytest.approx(want)
    assert _extra_eval_seconds(plan, layers, rates, SimpleNamespace(eval_evals=["core"])) == 0


def test_the_plan_counts_autointerp() -> None:
    from types import SimpleNamespace

    from gemmascope.evaluate.autointerp import ASK_SECONDS
    from gemmascope.suite.plan import Rates, _extra_eval_seconds

    plan = SimpleNamespace(widths=[1000], target_l0s=[20, 50], sites=["resid_post"], n_layers=4)
    rates = Rates(device="cpu", body=1000.0, lm=100.0)
    cfg = SimpleNamespace(eval_evals=["core", "autointerp"], eval_tokens=2000,
                          eval_autointerp_latents=10)  # fmt: skip
    asks = 3 * 10 * 2 * ASK_SECONDS  # 3 requests per latent, 2 SAEs a layer
    want = 2000 / 1000 * (2 / 4 + 4 / 4) + 2 * asks
    assert _extra_eval_seconds(plan, [1, 3], rates, cfg) == pytest.approx(want)
