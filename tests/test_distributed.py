"""Two processes (torchrun, gloo, CPU) give what one process gives: training, resume, the cache."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny, tiny_tokenizer
from distributed_worker import SPECS, Killed, batches, cache_config, config, suite_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from gemmascope import io
from gemmascope.activations import CacheConfig, build_cache
from gemmascope.activations.files import read_manifest
from gemmascope.cli import app
from gemmascope.common import devices, distributed
from gemmascope.train import TrainConfig, train
from gemmascope.train import loop as train_mod
from gemmascope.train.dense import dense_forward_backward

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One-process references, then one `torchrun --nproc-per-node 2` of the worker over them."""
    root = tmp_path_factory.mktemp("dist")
    train(SPECS, batches(), config(), root / "one", progress=False)
    with pytest.raises(Killed):  # for two ranks to resume
        train(SPECS, batches(cut=True), config(), root / "cut_one", progress=False)
    assert (root / "cut_one" / "checkpoint" / "state.json").exists()
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(400):
            words = " ".join(f"w{rng.randrange(3, 64)}" for _ in range(rng.randrange(5, 60)))
            f.write(json.dumps({"text": words}) + "\n")
    model, tok = build_tiny("gemma3"), tiny_tokenizer()
    build_cache(cache_config(root / "cache_one", root / "docs.jsonl"), model=model, tokenizer=tok,
                progress=False)  # fmt: skip
    _as_if_killed(root / "cache_one", root / "cache_resumed")
    from gemmascope.suite import build_suite

    build_suite(suite_config(root / "suite_one", root / "docs.jsonl"), model=model, tokenizer=tok,
                progress=False, echo=lambda _: None)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(root)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def _as_if_killed(cache: Path, out: Path) -> None:
    """A copy of `cache` as a killed two-rank run leaves it: shards 0-1 named, 3 pending, 2 and 4 lost."""
    shutil.copytree(cache, out)
    manifest = read_manifest(out)
    shards = manifest["shards"]
    (out / "pending").mkdir()
    (out / "pending" / "shard-00003.json").write_text(json.dumps(shards[3]))
    for entry in (shards[2], shards[4]):
        for rel in entry["files"]:
            (out / rel).unlink()
    manifest.update(shards=shards[:2], complete=False)
    (out / "manifest.json").write_text(json.dumps(manifest))


def _assert_same_saes(a: Path, b: Path, atol: float = 2e-5) -> None:
    for spec in SPECS:
        got, want = io.load(a / spec.name), io.load(b / spec.name)
        for key, value in want.state_arrays().items():
            torch.testing.assert_close(
                got.state_arrays()[key], value, rtol=1e-4, atol=atol, msg=f"{spec.name} {key}"
            )


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", ["data", "latents"])
def test_two_ranks_train_the_same_weights_as_one_process(root: Path, mode: str) -> None:
    """Data parallel (half of each batch per rank) and latent sharding (half of the latents per rank,
    TopK/BatchTopK selected globally) give one process's weights, for every architecture."""
    _assert_same_saes(root / mode, root / "one")
    log = [json.loads(line) for line in (root / mode / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (root / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == len(ref)  # written once, by rank 0
    for a, b in zip(log, ref, strict=True):
        assert (
            a["l0"] == pytest.approx(b["l0"], rel=1e-4) and a["dead_fraction"] == b["dead_fraction"]
        )
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-4)


def test_checkpoints_resume_on_another_number_of_ranks(root: Path) -> None:
    """A two-rank latent-sharded checkpoint resumes in one process, and a one-process checkpoint on
    two data-parallel ranks, each to the uninterrupted run's weights."""
    state = load_file(root / "cut_ranks" / "checkpoint" / "state.safetensors")
    assert state["0.params.W_enc"].shape == (16, 64)  # gathered to full width, written once
    assert json.loads((root / "cut_ranks" / "checkpoint" / "state.json").read_text())["step"] == 3
    assert not (root / "cut_ranks" / "complete.json").exists()
    resumed = root / "cut_ranks_resumed"
    shutil.copytree(root / "cut_ranks", resumed)
    train(SPECS, batches(), config(), resumed, resume=True, progress=False)
    _assert_same_saes(resumed, root / "one")
    _assert_same_saes(root / "cut_one", root / "one")


def test_torch_path_trains_like_the_cpu_kernels(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path GPUs take (dense autograd), run here on the CPU, reaches the same weights."""
    monkeypatch.setattr(train_mod, "forward_backward", dense_forward_backward)
    train(SPECS, batches(), config(), tmp_path, progress=False)
    _assert_same_saes(tmp_path, root / "one")


# ---------------------------------------------------------------------------- the cache
def _files(cache: Path) -> dict[str, str]:
    return {
        rel: meta["sha256"]
        for s in read_manifest(cache)["shards"]
        for rel, meta in s["files"].items()
    }


def test_two_ranks_cache_what_one_process_caches(root: Path) -> None:
    one, ranks = read_manifest(root / "cache_one"), read_manifest(root / "cache_ranks")
    assert ranks["complete"] and ranks["identity"] == one["identity"]
    assert [s["tokens"] for s in ranks["shards"]] == [700, 700, 700, 700, 200]
    assert _files(root / "cache_ranks") == _files(root / "cache_one")  # byte for byte
    assert not (root / "cache_ranks" / "pending").exists()


def test_two_ranks_resume_a_killed_cache(root: Path) -> None:
    """Named shards and a finished pending one are kept; only the lost shards are recomputed."""
    resumed = root / "cache_resumed"
    assert read_manifest(resumed)["complete"]
    assert _files(resumed) == _files(root / "cache_one")
    assert not (resumed / "pending").exists() and not list(resumed.rglob("*.tmp"))


# ---------------------------------------------------------------------------- devices and dtypes
def test_device_and_dtype_options(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        TrainConfig(device="tpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        CacheConfig(out=tmp_path / "c", device="gpu")
    with pytest.raises(ValueError, match="`matmul_dtype` 'int8'"):
        TrainConfig(matmul_dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`parallel` 'pipeline'"):
        TrainConfig(parallel="pipeline")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        assert devices.resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            devices.resolve_device("cuda")
    assert distributed.shard_range(10, 0, 3) == (0, 4) and distributed.shard_range(10, 2, 3) == (
        7,
        10,
    )
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--layers", "0",
                                      "--target-l0", "5", "--device", "tpu"])  # fmt: skip
    assert result.exit_code == 2 and "unknown device 'tpu'" in result.output
    out, corpus = tmp_path / "bf16", tmp_path / "words.txt"
    corpus.write_text(" ".join(f"w{3 + i % 60}" for i in range(2000)))
    args = ["cache", "--model", str(tiny_folder), "--layers", "0", "--tokens", "300", "--corpus",
            str(corpus), "--context-size", "16", "--device", "auto", "--dtype", "bfloat16",
            "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    acts = load_file(out / "L00.resid_post" / "shard-00000.safetensors")["activations"]
    assert acts.dtype == torch.bfloat16 and acts.shape == (300, 32)


def test_bfloat16_products_train_close_to_float32(tmp_path: Path) -> None:
    """`--dtype bfloat16` runs the dense products in bfloat16 and keeps float32 weights."""
    saes: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config(matmul_dtype=dtype, checkpoint_every=10**9)
        saes[dtype] = train(SPECS[:1], batches(), cfg, tmp_path / dtype, progress=False)[
            SPECS[0].name
        ]
    a, b = (saes[d].state_arrays()["W_dec"] for d in ("float32", "bfloat16"))
    rel = (a - b).norm(dim=1) / a.norm(dim=1)  # per latent (rows carry the folded input scale)
    assert b.dtype == torch.float32 and rel.max() < 0.05, rel.max()


# ---------------------------------------------------------------------------- the suite
def test_two_ranks_build_the_suite_one_process_builds(root: Path) -> None:
    """`gemmascope suite` under torchrun: every stage done, the same SAEs and the same metrics."""
    from gemmascope.evaluate import read_results
    from gemmascope.suite import read_manifest

    one, ranks = root / "suite_one", root / "suite_ranks"
    manifest = read_manifest(ranks)
    assert manifest["plan"]["groups"] == [[0], [1]]
    assert {v["state"] for v in manifest["stages"].values()} == {"done"}
    assert len(manifest["stages"]) == len(read_manifest(one)["stages"])
    assert not list((ranks / "cache").glob("group-*")) and not list(ranks.rglob("checkpoint"))
    folders = sorted(p.parent.relative_to(one) for p in (one / "runs").rglob("cfg.json"))
    assert len(folders) == 4
    for rel in folders:
        got, want = io.load(ranks / rel).state_arrays(), io.load(one / rel).state_arrays()
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=2e-5, msg=f"{rel} {key}")
    got = {r["sae_id"]: r for r in read_results(ranks / "results.json")}
    want = {r["sae_id"]: r for r in read_results(one / "results.json")}
    assert got.keys() == want.keys()
    for sae_id, r in want.items():
        for metric in ("l0", "fvu", "delta_lm_loss"):
            assert got[sae_id][metric] == pytest.approx(r[metric], rel=1e-3, abs=1e-4), metric
    assert (ranks / "report" / "index.html").exists()
    assert (ranks / "publish" / "README.md").exists()
