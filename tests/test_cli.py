"""The command line: every flag users typed before the configs became the CLI still reaches the same
field, lists take commas or repeats, bad values are messages (exit 2), and bugs keep their traceback."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from gemmascope.activations import CacheConfig
from gemmascope.cli import app
from gemmascope.cli.flags import command


def _capture(monkeypatch: pytest.MonkeyPatch, target: str, args: list[str]) -> Any:
    """Run `gemmascope ARGS` with the library call `target` replaced; return what it was given."""
    module, name = target.rsplit(".", 1)
    seen: list[Any] = []
    mod = importlib.import_module(module)

    def fake(cfg: Any, *rest: Any, **kw: Any) -> Any:
        seen.append(cfg)
        return {} if name != "run_eval" else [_record()]

    monkeypatch.setattr(mod, name, fake)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return seen[0]


def _record() -> dict[str, Any]:
    return {"source": "s", "sae_id": None, "layer": 6, "site": "resid_post", "width": 16, "l0": 1.0,
            "fvu": 0.1, "delta_lm_loss": 0.2, "frac_recovered": None, "dead": 0, "tokens": 10}  # fmt: skip


def test_suite_flags_reach_the_nested_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _capture(monkeypatch, "gemmascope.suite.build_suite", [
        "suite", "--out", "s", "--sites", "resid_post,mlp_out", "--layers", "0-1", "--widths", "4k",
        "--l0", "20,50", "--tokens", "150k", "--train-tokens", "300k", "--eval-tokens", "4k",
        "--batch-size", "1024", "--lr", "2e-3", "--encoder-init-scale", "0.1", "--center",
        "--cache-dtype", "bfloat16", "--model-batch-size", "4", "--no-ablations",
        "--checkpoint-every", "50", "--disk-budget", "2G", "--seed", "3", "--matmul-dtype", "bfloat16",
    ])  # fmt: skip
    assert cfg.sites == ["resid_post", "mlp_out"] and cfg.widths == [4096]
    assert cfg.target_l0s == [20.0, 50.0] and cfg.disk_budget == 2 * 1024**3
    assert (
        cfg.cache.tokens == 150_000 and cfg.cache.dtype == "bfloat16" and cfg.cache.batch_size == 4
    )
    assert cfg.train.tokens == 300_000 and cfg.train.batch_size == 1024 and cfg.train.lr == 2e-3
    assert cfg.train.center and cfg.train.encoder_init_scale == 0.1 and cfg.train.seed == 3
    assert cfg.train.checkpoint_every == 50 and cfg.train.matmul_dtype == "bfloat16"
    assert cfg.eval.tokens == 4000 and not cfg.eval.ablations and cfg.eval.batch_size == 4
    assert cfg.train.model == cfg.cache.model == cfg.eval.model == "gemma-3-270m"


def test_train_flags_and_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    job = _capture(monkeypatch, "gemmascope.train.job.run_job", [
        "train", "--out", "r", "--activations", "acts", "--layers", "6", "--sites", "resid_post",
        "--sites", "mlp_out", "--widths", "1k,4k", "--target-l0", "20,50", "--tokens", "20k",
        "--batch-size", "500", "--lr", "0.002", "--dtype", "bfloat16", "--no-center", "--resume",
    ])  # fmt: skip
    assert job.grid.sites == ["resid_post", "mlp_out"] and job.grid.widths == [1024, 4096]
    assert job.grid.target_l0 == [20.0, 50.0] and job.train.tokens == 20_000
    assert job.train.matmul_dtype == "bfloat16" and job.resume and job.activations == Path("acts")
    assert job.given >= {"tokens", "batch_size", "lr", "matmul_dtype", "center"}
    assert "seed" not in job.given  # flags left out do not override a sweep file's values


def test_cache_eval_and_index_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _capture(monkeypatch, "gemmascope.activations.build_cache", [
        "cache", "--out", "c", "--layers", "6", "--sites", "resid_post,mlp_out", "--tokens", "4k",
        "--context-size", "256", "--dtype", "bfloat16", "--keep-special", "--shard-tokens", "700",
    ])  # fmt: skip
    assert cache.tokens == 4000 and cache.sites == ["resid_post", "mlp_out"] and cache.keep_special
    job = _capture(monkeypatch, "gemmascope.evaluate.job.run_eval", [
        "eval", "a", "b", "--out", "r.json", "--sae-id", "x", "--sae-id", "y", "--tokens", "256",
        "--context-size", "256", "--no-ablations", "--split", "all",
    ])  # fmt: skip
    assert job.sources == ["a", "b"] and job.sae_id == ["x", "y"] and job.eval.tokens == 256
    assert not job.eval.ablations and job.eval.split == "all" and job.eval.model == "gemma-3-270m"
    index = _capture(monkeypatch, "gemmascope.explore.index.build_index", [
        "index", "sae_dir", "--out", "f.sqlite", "--tokens", "1k", "--top-k", "5", "--window", "4",
    ])  # fmt: skip
    assert index.sae_source == "sae_dir" and index.tokens == 1000 and index.top_k == 5


@pytest.mark.parametrize(
    "args,message",
    [
        (["cache", "--out", "c", "--tokens", "lots"], "--tokens: cannot read the count 'lots'"),
        (["cache", "--out", "c", "--dtype", "int8"], "unknown --dtype 'int8'; choose one of"),
        (["train", "--out", "r", "--widths", "wide"], "--widths: cannot read the width 'wide'"),
        (["suite", "--out", "s", "--disk-budget", "lots"], "--disk-budget: cannot read the size"),
        (["eval", "x", "--out", "r.json", "--batch-size", "many"], "--batch-size: 'many' is not a"),
        (["suite", "--out", "s", "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_values_are_messages_before_any_work(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_bug_keeps_its_traceback() -> None:
    """Only what a user can fix is shown as a message: a `KeyError` in our code is a bug."""
    from dataclasses import dataclass

    @dataclass
    class Nothing:
        pass

    probe = typer.Typer()

    def boom(cfg: Nothing) -> None:
        raise KeyError("internal")

    command(probe.command("boom"), Nothing)(boom)
    probe.command("other")(lambda: None)
    result = CliRunner().invoke(probe, ["boom"])
    assert isinstance(result.exception, KeyError) and "error:" not in result.output


def test_a_sweep_files_batch_size_joins_the_flags_before_the_run_is_checked(tmp_path: Path) -> None:
    """`--tokens 2k` with the default batch of 4,096 is too short alone, not with the file's 256."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text("train: {batch_size: 256, tokens: 100000}\n")
    args = ["train", "--out", str(tmp_path / "r"), "--spec", str(spec), "--tokens", "2k",
            "--activations", str(tmp_path / "none"), "--layers", "0", "--target-l0", "4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "manifest.json: not found" in result.output, result.output


def test_a_suite_batch_over_the_default_tokens_is_checked_with_its_own_tokens() -> None:
    from gemmascope.suite import SuiteConfig
    from gemmascope.train.config import TrainFlags

    cfg = SuiteConfig(out=Path("s"), train=TrainFlags(batch_size=4_000_000), train_tokens=8_000_000,
                      cache=CacheConfig(tokens=8_000_000))  # fmt: skip
    assert cfg.train.batch_size == 4_000_000 and cfg.train.tokens == 8_000_000


def test_explore_answers_to_the_names_it_is_given(tmp_path: Path) -> None:
    from gemmascope.cli import Explore

    cfg = Explore(sources=[tmp_path / "f.sqlite"], host="0.0.0.0", allow_host=["box.lan"])
    assert cfg.allow_host == ["box.lan"]
    with pytest.raises(ValueError, match="`port` must be <= 65535"):
        Explore(sources=[tmp_path / "f.sqlite"], port=70_000)


def test_explore_names_what_it_cannot_open(tmp_path: Path) -> None:
    """A missing path or a folder without indexes: one clear line, no traceback, before serving."""
    from typer.testing import CliRunner

    from gemmascope.cli import app

    missing = CliRunner().invoke(app, ["explore", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "no such file or folder" in missing.output
    assert "Traceback" not in missing.output
    empty = CliRunner().invoke(app, ["explore", str(tmp_path)])
    assert empty.exit_code != 0 and "holds no feature index" in empty.output
