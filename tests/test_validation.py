"""Nothing silently wrong: every value is checked before work, non-finite numbers are refused where
they enter, a resume never mixes configs, and a refused run leaves its folder as it found it.

Each case of the hostile-input campaign is one test case here (docs/validation.md lists them)."""

from __future__ import annotations

import dataclasses
import math
import random
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import gemmascope
from gemmascope import io
from gemmascope.activations import CacheConfig
from gemmascope.cli import app
from gemmascope.common import config as C
from gemmascope.evaluate import EvalConfig
from gemmascope.explore.index import IndexConfig
from gemmascope.sae import SAE, SAEConfig
from gemmascope.suite import SuiteConfig
from gemmascope.train import Grid, SAESpec, TrainConfig, tensor_batches, train

SITE = (0, "resid_post")
FAST = dict(batch_size=256, lr_warmup_steps=2, l0_warmup_steps=2, norm_batches=2, log_every=2)


def _spec(**kw: Any) -> SAESpec:
    return SAESpec(**{"layer": 0, "site": "resid_post", "width": 64, "target_l0": 4.0, **kw})


# --- 1, 4, 5: bad values are a ValueError naming the field, before anything loads or is written ---
BAD_CONFIGS = [
    (TrainConfig, {"lr": math.nan}, "`lr` must be a finite number"),
    (TrainConfig, {"lr": math.inf}, "`lr` must be a finite number"),
    (TrainConfig, {"lr": -1e-3}, "`lr` must be > 0"),
    (TrainConfig, {"lr": 0.0}, "`lr` must be > 0"),
    (TrainConfig, {"batch_size": 0}, "`batch_size` must be >= 1"),
    (TrainConfig, {"tokens": 0}, "`tokens` must be >= 1"),
    (TrainConfig, {"encoder_init_scale": math.nan}, "`encoder_init_scale` must be a finite"),
    (TrainConfig, {"beta2": 1.0}, "`beta2` must be < 1"),
    (TrainConfig, {"bandwidth": 0.0}, "`bandwidth` must be > 0"),
    (TrainConfig, {"checkpoint_every": 0}, "`checkpoint_every` must be >= 1"),
    (SAESpec, {"target_l0": math.nan}, "`target_l0` must be a finite number"),
    (SAESpec, {"target_l0": 0.0}, "`target_l0` must be > 0"),
    (SAESpec, {"target_l0": -5.0}, "`target_l0` must be > 0"),
    (SAESpec, {"target_l0": None, "l0_coefficient": math.nan}, "`l0_coefficient` must be a finite"),
    (SAESpec, {"target_l0": None, "l0_coefficient": -1.0}, "`l0_coefficient` must be >= 0"),
    (SAESpec, {"width": 0}, "`width` must be >= 1"),
    (SAESpec, {"width": -4096}, "`width` must be >= 1"),
    (SAESpec, {"architecture": "topk", "target_l0": None, "k": -3}, "`k` must be >= 1"),
    (
        SAESpec,
        {"architecture": "topk", "target_l0": None, "k": 1000, "width": 256},
        "k=1000 is more than the width 256",
    ),  # fmt: skip
    (SAESpec, {"target_l0": 100.0, "width": 64}, "target_l0=100 is more than the width 64"),
    (
        SAESpec,
        {"aux_k": -1, "architecture": "topk", "target_l0": None, "k": 4},
        "`aux_k` must be >= 0",
    ),
    (CacheConfig, {"context_size": 1}, "`context_size` must be >= 2"),
    (CacheConfig, {"eval_fraction": 2.0}, "`eval_fraction` must be < 1"),
    (CacheConfig, {"eval_fraction": math.nan}, "`eval_fraction` must be a finite"),
    (CacheConfig, {"tokens": -5}, "`tokens` must be >= 1"),
    (EvalConfig, {"tokens": 0}, "`tokens` must be >= 1"),
    (EvalConfig, {"eval_fraction": -0.5}, "`eval_fraction` must be >= 0"),
    (IndexConfig, {"window": -1}, "`window` must be >= 0"),
    (IndexConfig, {"checkpoint_seconds": math.nan}, "`checkpoint_seconds` must be a finite"),
    (SuiteConfig, {"target_l0s": [math.nan]}, "`target_l0s` must be a finite number"),
    (SuiteConfig, {"widths": [0]}, "`widths` must be >= 1"),
    (Grid, {"target_l0": [-1.0]}, "`target_l0` must be > 0"),
]


def _make(cls: type, over: dict[str, Any]) -> Any:
    base: dict[str, Any] = {
        SAESpec: {"layer": 0, "site": "resid_post", "width": 64, "target_l0": 4.0},
        IndexConfig: {"sae_source": "x", "out": Path("x.sqlite")},
        SuiteConfig: {"out": Path("s")},
    }.get(cls, {})
    return cls(**{**base, **over})


@pytest.mark.parametrize("cls,over,message", BAD_CONFIGS,
                         ids=[f"{c.__name__}-{'-'.join(o)}-{i}" for i, (c, o, _) in enumerate(BAD_CONFIGS)])  # fmt: skip
def test_a_bad_value_is_refused_by_its_config(
    cls: type, over: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _make(cls, over)


CONFIGS = [TrainConfig, SAESpec, CacheConfig, EvalConfig, IndexConfig, SuiteConfig, Grid, SAEConfig]


def _bad_values(tp: Any, rng: random.Random) -> list[Any]:
    """Values no field of type `tp` may take, whatever its bounds: non-finite floats, wrong types."""
    base, _ = C._unwrap(tp)
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        return [[v] for v in _bad_values(item, rng)]
    if origin is typing.Literal:
        return ["not-a-" + "".join(rng.choices("xyz", k=5))]
    if base is float:
        return [math.nan, math.inf, -math.inf, "1e-3"]
    if base is int:
        return [math.nan, 2.5, "7", True]
    if base is bool:
        return ["yes", 3]
    return []


def test_random_bad_values_fail_in_every_config_before_any_work(tmp_path: Path) -> None:
    """Property-style: thousands of random bad values over every field of every config, each a
    ValueError from the constructor (nothing is read, loaded or written: the folder stays empty)."""
    rng = random.Random(0)
    tried = 0
    for cls in CONFIGS:
        hints = C.hints(cls)
        for f in dataclasses.fields(cls):
            if "nested" in f.metadata or f.name in ("extra",):
                continue
            for bad in _bad_values(hints[f.name], rng):
                base = {"out": tmp_path / "never"} if cls in (CacheConfig, SuiteConfig) else {}
                if cls is SAEConfig:
                    base = {"architecture": "jumprelu", "d_in": 4, "d_sae": 8}
                with pytest.raises(ValueError, match=f.name):
                    _make(cls, {**base, f.name: bad})
                tried += 1
    assert tried > 200 and not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--lr", "nan"], "`lr` must be a finite number"),
        (["--lr", "inf"], "`lr` must be a finite number"),
        (["--lr", "-1"], "`lr` must be > 0"),
        (["--target-l0", "nan"], "`target_l0` must be a finite number"),
        (["--target-l0", "0"], "`target_l0` must be > 0"),
        (["--batch-size", "0"], "`batch_size` must be >= 1"),
        (["--widths", "0"], "`widths` must be >= 1"),
        (["--widths", "-4k"], "--widths: cannot read the width '-4k'"),
        (["--encoder-init-scale", "nan"], "`encoder_init_scale` must be a finite"),
        (
            ["--architecture", "topk", "--k", "1000", "--widths", "256"],
            "k=1000 is more than the width",
        ),
        (["--architecture", "topk", "--k", "-3"], "`k` must be >= 1"),
    ],
)
def test_train_refuses_bad_flags_before_any_work(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    base = ["train", "--out", str(tmp_path / "run"), "--activations", str(tmp_path / "none"),
            "--layers", "0", "--tokens", "2k", "--batch-size", "500"]  # fmt: skip
    sparsity = [] if {"--architecture", "--target-l0"} & set(flags) else ["--target-l0", "4"]
    result = CliRunner().invoke(app, [*base, *sparsity, *flags])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


# --- 1: non-finite numbers where they enter -------------------------------------------------------
def _sae(**over: Any) -> SAE:
    g = torch.Generator().manual_seed(0)
    arrays = {"W_enc": torch.randn(8, 16, generator=g), "W_dec": torch.randn(16, 8, generator=g),
              "b_enc": torch.zeros(16), "b_dec": torch.zeros(8), "threshold": torch.full((16,), 0.1)}  # fmt: skip
    arrays.update(over)
    return SAE.from_arrays(SAEConfig("jumprelu", d_in=8, d_sae=16, layer=0, site="resid_post"),
                           arrays, allow_nonfinite=True)  # fmt: skip


@pytest.mark.parametrize("fmt", ["gemmascope", "saelens", "npz"])
def test_loading_non_finite_weights_is_refused_unless_asked(tmp_path: Path, fmt: str) -> None:
    w = torch.randn(16, 8)
    w[3, 2] = math.nan
    path = io.save(_sae(W_dec=w), tmp_path / "nan", format=fmt)
    with pytest.raises(ValueError, match=r"W_dec.*1 non-finite value.*allow_nonfinite=True"):
        gemmascope.load(path)
    assert math.isnan(float(gemmascope.load(path, allow_nonfinite=True).W_dec[3, 2]))
    info = CliRunner().invoke(app, ["sae-info", str(path)])
    assert info.exit_code == 2 and "non-finite" in info.output
    conv = CliRunner().invoke(app, ["convert", str(path), str(tmp_path / "out"), "--to", "saelens"])
    assert conv.exit_code == 2 and "non-finite" in conv.output and not (tmp_path / "out").exists()


def test_a_non_finite_training_step_stops_with_the_last_good_checkpoint(tmp_path: Path) -> None:
    clean = tensor_batches({SITE: torch.randn(4096, 32)}, 256)

    def batches(start: int) -> Any:
        for i, b in enumerate(clean(start), start):
            if i == 5:  # the sixth batch holds one infinity: steps 0..4 are fine, step 5 is not
                b[SITE][7, 3] = math.inf
            yield b

    cfg = TrainConfig(tokens=4096, checkpoint_every=2, **FAST)
    with pytest.raises(RuntimeError, match=r"non-finite loss \(.*\) at step 5.*checkpoint.*step 4"):
        train([_spec(width=64)], batches, cfg, tmp_path, progress=False)
    assert not (tmp_path / _spec().name).exists()  # no SAE saved
    assert (tmp_path / "checkpoint" / "state.json").exists()


def test_non_finite_activations_are_refused_where_they_enter(tmp_path: Path) -> None:
    x = torch.randn(2048, 32)
    x[::7, 4] = math.nan  # so some are among the batches the input scale is estimated from
    cfg = TrainConfig(tokens=2048, **FAST)
    with pytest.raises(ValueError, match="layer 0 resid_post: non-finite activations"):
        train([_spec()], tensor_batches({SITE: x}, 256), cfg, tmp_path, progress=False)


# --- 3: a resume never mixes configs ---------------------------------------------------------------
def _interrupted_run(out: Path) -> tuple[torch.Tensor, TrainConfig]:
    """A run killed after its first checkpoint in `out`; its data and config, to resume it."""
    x = torch.randn(4096, 32)
    cfg = TrainConfig(tokens=4096, checkpoint_every=4, **FAST)

    def dying(start: int) -> Any:
        for i, b in enumerate(tensor_batches({SITE: x}, 256)(start)):
            if i == 6:
                raise KeyboardInterrupt
            yield b

    with pytest.raises(KeyboardInterrupt):
        train([_spec()], dying, cfg, out, progress=False)
    return x, cfg


def test_resume_refuses_a_changed_config_and_names_the_fields(tmp_path: Path) -> None:
    x, cfg = _interrupted_run(tmp_path)
    changed = dataclasses.replace(cfg, lr=1e-3)
    with pytest.raises(ValueError, match=r"lr: the run has 0.002, this one 0.001"):
        train([_spec()], tensor_batches({SITE: x}, 256), changed, tmp_path, resume=True,
              progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"target_l0: the run has 4.0, this one 5.0"):
        train([_spec(target_l0=5.0)], tensor_batches({SITE: x}, 256), cfg, tmp_path, resume=True,
              progress=False)  # fmt: skip
    sae = train([_spec()], tensor_batches({SITE: x}, 256), cfg, tmp_path, resume=True,
                progress=False)[_spec().name]  # fmt: skip
    assert sae.cfg.extra["train_config"]["lr"] == cfg.lr


def test_resume_of_a_run_saved_before_the_recipes_compares_their_old_values(tmp_path: Path) -> None:
    """A run saved before `threshold_lr` and `frequency_penalty` existed trained with 1 and 0: the
    default recipe's 10 and 0.1 must not continue it silently."""
    import json

    x, cfg = _interrupted_run(tmp_path)
    file = tmp_path / "train_config.json"
    saved = json.loads(file.read_text())
    for key in ("recipe", "threshold_lr", "frequency_penalty", "max_frequency"):
        del saved["train"][key]
    file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"threshold_lr: the run has 1.0, this one 10.0"):
        train([_spec()], tensor_batches({SITE: x}, 256), cfg, tmp_path, resume=True,
              progress=False)  # fmt: skip
    old = dataclasses.replace(cfg, threshold_lr=1.0, frequency_penalty=0.0, recipe="paper")
    train([_spec()], tensor_batches({SITE: x}, 256), old, tmp_path, resume=True, progress=False)


# --- 6, 7: a refused run leaves its folder as it found it; nothing overwrites what it did not write -
@pytest.mark.parametrize("flags", [["--context-size", "1"], ["--eval-fraction", "2"]])
def test_a_refused_cache_run_writes_nothing(tmp_path: Path, flags: list[str]) -> None:
    out = tmp_path / "cx"
    result = CliRunner().invoke(app, ["cache", "--out", str(out), "--tokens", "1k", *flags])
    assert result.exit_code == 2 and not out.exists(), result.output


def test_index_refuses_to_overwrite_a_file_it_did_not_write(tmp_path: Path) -> None:
    mine = tmp_path / "notes.sqlite"
    mine.write_text("my notes")
    result = CliRunner().invoke(app, ["index", "sae", "--out", str(mine)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert mine.read_text() == "my notes"


# --- 10: leftovers of killed writes are cleaned; files get the usual mode ---------------------------
def test_a_killed_atomic_write_leaves_nothing_the_next_write_keeps(tmp_path: Path) -> None:
    import os
    import subprocess

    from gemmascope.common import files

    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = proc.pid
    killed = tmp_path / f".sae.{files._HOST}-{dead}.abcd1234.tmp"  # a killed save of ours
    old = tmp_path / ".sae.zyxw9876.tmp"  # from before pids were recorded, a day old
    live = tmp_path / f".sae.{files._HOST}-{os.getpid()}.live0000.tmp"  # a write still going on
    sibling = tmp_path / f".sae.partial.{files._HOST}-{dead}.abcd1234.tmp"  # another file's
    for folder in (killed, old, live, sibling):
        folder.mkdir()
        (folder / "big.bin").write_bytes(b"0" * 1000)
    os.utime(old, (0, 0))
    with files.atomic_dir(tmp_path / "sae") as tmp:
        (tmp / "cfg.json").write_text("{}")
    assert not killed.exists() and not old.exists()
    assert live.exists() and sibling.exists() and (tmp_path / "sae" / "cfg.json").exists()


def test_weight_files_get_the_same_mode_as_their_config(tmp_path: Path) -> None:
    folder = io.save(_sae(), tmp_path / "sae")
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_a_misshapen_w_enc_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'W_enc' has shape \(8, 15\), expected \(8, 16\)"):
        _sae(W_enc=torch.randn(8, 15))


# --- 1, 8: a damaged cache never trains ------------------------------------------------------------
def _tiny_cache(tmp_path: Path, corpus: Path) -> Path:
    from conftest import build_tiny, tiny_tokenizer

    from gemmascope.activations import build_cache

    cfg = CacheConfig(out=tmp_path / "cache", model="tiny-gemma3", layers="0", tokens=1000,
                      corpus=str(corpus), context_size=16, batch_size=4, shard_tokens=400)  # fmt: skip
    return build_cache(cfg, model=build_tiny("gemma3"), tokenizer=tiny_tokenizer(), progress=False)


def _rewrite(shard: Path, change: Any, *, fix_manifest: bool) -> None:
    from safetensors.torch import load_file, save_file

    from gemmascope.activations import read_manifest
    from gemmascope.common.files import sha256_file, write_json

    tensors = load_file(shard)
    change(tensors["activations"])
    save_file(tensors, shard)
    if fix_manifest:  # as if the model itself had produced the value: the checksum agrees
        cache = shard.parents[1]
        manifest = read_manifest(cache)
        rel = shard.relative_to(cache).as_posix()
        for entry in manifest["shards"]:
            if rel in entry["files"]:
                entry["files"][rel].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
        write_json(cache / "manifest.json", manifest)


def test_a_nan_in_a_cache_shard_is_an_error_naming_shard_and_row(
    tmp_path: Path, corpus: Path
) -> None:
    from gemmascope.activations import CachedActivations

    cache = _tiny_cache(tmp_path, corpus)
    shard = cache / "L00.resid_post" / "shard-00001.safetensors"
    _rewrite(shard, lambda a: a[37].fill_(math.nan), fix_manifest=True)
    data = CachedActivations(cache, SITE, batch_size=100, epochs=1)
    with pytest.raises(
        ValueError, match=r"shard-00001.safetensors: row 37: a non-finite activation"
    ):
        list(data.batches())


def test_flipped_bytes_in_a_shard_are_caught_when_it_is_opened(
    tmp_path: Path, corpus: Path
) -> None:
    from gemmascope.activations import CachedActivations

    cache = _tiny_cache(tmp_path, corpus)
    shard = cache / "L00.resid_post" / "shard-00000.safetensors"
    _rewrite(shard, lambda a: a[5].mul_(1.0001), fix_manifest=False)  # same size, other bytes
    with pytest.raises(ValueError, match="sha256 differs"):
        CachedActivations(cache, SITE, batch_size=100)


# --- 5: a full disk is a message naming the folder, and nothing partial is kept ---------------------
def _disk_full(*args: Any, **kw: Any) -> None:
    raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                       'message: "No space left on device" })')  # fmt: skip


def test_a_full_disk_while_saving_an_sae_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    from gemmascope.common.files import DiskFullError

    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full)
    with pytest.raises(DiskFullError, match=rf"{tmp_path}: the disk is full .* while writing sae"):
        io.save(_sae(), tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_caching_is_named_and_resumable(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gemmascope.activations import files as cache_files
    from gemmascope.common.files import DiskFullError

    monkeypatch.setattr(cache_files, "save_file", _disk_full)
    with pytest.raises(DiskFullError, match="the disk is full"):
        _tiny_cache(tmp_path, corpus)
    monkeypatch.undo()
    _tiny_cache(tmp_path, corpus)  # space again: the same command finishes the cache


# --- 2: sizes the model or the machine cannot take are refused before the first forward ------------
def test_a_context_longer_than_the_model_takes_is_refused(tmp_path: Path, corpus: Path) -> None:
    from conftest import build_tiny, tiny_tokenizer

    from gemmascope.activations import build_cache

    cfg = CacheConfig(out=tmp_path / "c", model="tiny", layers="0", tokens=1000, corpus=str(corpus),
                      context_size=100_000)  # fmt: skip
    with pytest.raises(ValueError, match="100,000 is more than the 64 tokens this model takes"):
        build_cache(cfg, model=build_tiny("gemma3"), tokenizer=tiny_tokenizer(), progress=False)
    assert not cfg.out.exists()


def test_a_batch_that_cannot_fit_in_memory_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import build_tiny

    from gemmascope import models

    monkeypatch.setattr(models, "available_memory", lambda: 10 << 20)  # 10 MiB free
    with pytest.raises(ValueError, match="lower the sequences per forward"):
        models.check_forward(build_tiny("gemma3"), 512, 64)
    models.check_forward(build_tiny("gemma3"), 1, 16)  # a small one fits
