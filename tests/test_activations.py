"""The activation cache and both batch sources: exactness, resume after kill -9, shuffling, errors."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import build_tiny, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file
from torch.testing import assert_close
from typer.testing import CliRunner

from gemmascope import activations
from gemmascope.activations import (
    CacheConfig,
    CachedActivations,
    ModelActivations,
    activation_stream,
    build_cache,
)
from gemmascope.activations.files import read_manifest
from gemmascope.cli import app
from gemmascope.common.units import parse_count
from gemmascope.corpus import collected_mask, iter_documents, pack_sequences, special_ids
from gemmascope.hooks import collect
from gemmascope.models import load_model

KEYS = [(0, "resid_post"), (1, "mlp_out"), (2, "attn_z")]
T = 16  # context size; the tiny models allow 64 positions


@pytest.fixture(scope="module")
def lm() -> tuple[Any, Any]:
    return build_tiny("gemma3"), tiny_tokenizer()


def _cfg(out: Path, corpus: Path, **kw: Any) -> CacheConfig:
    base = dict(model="tiny-gemma3", layers="0-2", sites=["resid_post", "mlp_out", "attn_z"],
                tokens=3000, corpus=str(corpus), context_size=T, batch_size=4, shard_tokens=700)  # fmt: skip
    return CacheConfig(out=out, **{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, corpus: Path, lm: tuple[Any, Any]) -> Path:
    out = tmp_path_factory.mktemp("caches") / "f32"
    return build_cache(_cfg(out, corpus), model=lm[0], tokenizer=lm[1], progress=False)


def _shards(out: Path, key: tuple[int, str] | None = None) -> list[dict[str, torch.Tensor]]:
    m = read_manifest(out)
    folder = "tokens" if key is None else activations.site_dir(key)
    return [load_file(out / folder / f"shard-{s['index']:05d}.safetensors") for s in m["shards"]]


def _rows(out: Path, key: tuple[int, str]) -> torch.Tensor:
    return torch.cat([s["activations"] for s in _shards(out, key)])  # (N, W)


def _stream_positions(
    corpus: Path, tok: Any, n: int, keep_special: bool = False
) -> list[tuple[int, int]]:
    """(sequence, position) of the first n collected tokens, straight from the packer."""
    skip = [] if keep_special else special_ids(tok)
    out: list[tuple[int, int]] = []
    for s, seq in enumerate(pack_sequences(iter_documents(corpus, "train"), tok, T)):
        out += [(s, int(p)) for p in np.flatnonzero(collected_mask(seq, skip))]
        if len(out) >= n:
            return out[:n]
    raise AssertionError("corpus too small")


# ---------------------------------------------------------------------------- the cache
def test_cache_equals_direct_forward_and_traces_to_text(
    cache: Path, corpus: Path, lm: tuple[Any, Any]
) -> None:
    model, tok = lm
    m = read_manifest(cache)
    assert m["complete"] and [s["tokens"] for s in m["shards"]] == [700, 700, 700, 700, 200]
    sites = {(s["layer"], s["site"]): s["width"] for s in m["identity"]["sites"]}
    assert len(sites) == 9 and sites[0, "resid_post"] == 32 and sites[2, "attn_z"] == 64
    toks = _shards(cache)
    seq = torch.cat([t["sequence"] for t in toks])
    pos = torch.cat([t["position"] for t in toks])
    # exactly the first 3000 collected positions, in order: no duplicates, no gaps, no BOS/EOS/pad
    assert list(zip(seq.tolist(), pos.tolist(), strict=True)) == _stream_positions(
        corpus, tok, 3000
    )
    acts = {key: _shards(cache, key) for key in KEYS}
    for k, t in enumerate(toks):
        rows = {int(i): r for i, r in zip(t["sequence_ids"], t["sequences"], strict=True)}
        full = torch.stack([rows[int(i)] for i in t["sequence"]])  # (n, T)
        assert torch.equal(full.gather(1, t["position"].long()[:, None])[:, 0], t["token_ids"])
        assert not set(t["token_ids"].tolist()) & {0, 1, 2}
        # the same tokens through a direct forward give the same activations
        direct = collect(model, t["sequences"].long(), KEYS)
        row_of = {int(i): r for r, i in enumerate(t["sequence_ids"])}
        rows_idx = torch.tensor([row_of[int(i)] for i in t["sequence"]])
        for key in KEYS:
            want = direct[key][rows_idx, t["position"].long()]
            got = acts[key][k]["activations"]
            assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_keep_special_collects_every_position(
    tmp_path: Path, corpus: Path, lm: tuple[Any, Any]
) -> None:
    cfg = _cfg(tmp_path / "c", corpus, tokens=200, keep_special=True, sites=["resid_post"])
    build_cache(cfg, model=lm[0], tokenizer=lm[1], progress=False)
    (t,) = _shards(tmp_path / "c")
    assert (t["position"][:T] == torch.arange(T)).all() and t["token_ids"][0] == 2  # BOS at 0
    positions = list(zip(t["sequence"].tolist(), t["position"].tolist(), strict=True))
    assert positions == _stream_positions(corpus, lm[1], 200, keep_special=True)


def test_stream_start_stop_cut_exactly(corpus: Path, lm: tuple[Any, Any]) -> None:
    model, tok = lm

    def ids(start: int, stop: int) -> list[int]:
        seqs = pack_sequences(iter_documents(corpus), tok, T)
        chunks = activation_stream(model, seqs, KEYS[:1], batch_size=3, skip_ids=special_ids(tok),
                                   start=start, stop=stop)  # fmt: skip
        return torch.cat([c.token_ids for c in chunks]).tolist()

    full = ids(0, 1000)
    assert len(full) == 1000 and ids(123, 777) == full[123:777]


def test_bfloat16_round_trips(
    tmp_path: Path, cache: Path, corpus: Path, lm: tuple[Any, Any]
) -> None:
    out = build_cache(_cfg(tmp_path / "bf16", corpus, dtype="bfloat16"), model=lm[0],
                      tokenizer=lm[1], progress=False)  # fmt: skip
    with safe_open(str(out / "L02.attn_z" / "shard-00000.safetensors"), "pt") as f:
        assert f.get_slice("activations").get_dtype() == "BF16"
    for key in KEYS:
        assert torch.equal(_rows(out, key), _rows(cache, key).to(torch.bfloat16))
    kw: dict[str, Any] = dict(batch_size=256, buffer_size=1000, chunk_size=100, epochs=1)
    bf = list(CachedActivations(out, KEYS[2], dtype=torch.bfloat16, **kw).batches())
    f32 = list(CachedActivations(cache, KEYS[2], **kw).batches())
    assert all(torch.equal(a[KEYS[2]], b[KEYS[2]].bfloat16()) for a, b in zip(bf, f32, strict=True))


def test_kill_and_resume_gives_exact_tokens(
    tmp_path: Path, corpus: Path, tiny_folder: Path
) -> None:
    """A SIGKILLed `gemmascope cache` resumes to exactly the requested tokens, equal to one clean run."""
    out = tmp_path / "killed"
    args = ["cache", "--model", str(tiny_folder), "--layers", "0,2", "--sites", "resid_post,attn_z",
            "--tokens", "6000", "--shard-tokens", "300", "--context-size", str(T),
            "--batch-size", "2", "--corpus", str(corpus), "--out", str(out)]  # fmt: skip
    code = "import sys; from gemmascope.cli import app; sys.argv[0] = 'gemmascope'; app()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = read_manifest(out)
    assert not before["complete"] and 2 <= len(before["shards"]) < 20
    with pytest.raises(ValueError, match=r"incomplete \(\d+ of 6,000 tokens\); rerun the same"):
        CachedActivations(out, (0, "resid_post"))
    assert CachedActivations(out, (0, "resid_post"), partial=True).n_tokens == 300 * len(
        before["shards"]
    )
    # leftovers a kill can leave: a temp file, a shard written before the manifest named it
    (out / "L02.attn_z" / ".shard-00019.safetensors.x1y2.tmp").write_bytes(b"partial")
    (out / "L00.resid_post" / "shard-00019.safetensors").write_bytes(b"unlisted")

    model, tok = load_model(str(tiny_folder))
    cfg = dict(model=str(tiny_folder), layers="0,2", sites=["resid_post", "attn_z"], tokens=6000,
               shard_tokens=300, context_size=T, batch_size=2, corpus=str(corpus))  # fmt: skip
    build_cache(CacheConfig(out=out, **cfg), model=model, tokenizer=tok, progress=False)  # type: ignore[arg-type]
    clean = build_cache(CacheConfig(out=tmp_path / "clean", **cfg), model=model, tokenizer=tok,  # type: ignore[arg-type]
                        progress=False)  # fmt: skip

    after = read_manifest(out)
    assert after["complete"] and sum(s["tokens"] for s in after["shards"]) == 6000
    assert [s["tokens"] for s in after["shards"]] == [300] * 20
    assert (
        not list(out.rglob("*.tmp"))
        and (out / "L00.resid_post" / "shard-00019.safetensors").stat().st_size > 100
    )
    for a, b in zip(_shards(out), _shards(clean), strict=True):
        for name in ("token_ids", "sequence", "position", "sequences", "sequence_ids"):
            assert torch.equal(a[name], b[name]), name
    for key in [(0, "resid_post"), (2, "attn_z")]:
        assert torch.equal(_rows(out, key), _rows(clean, key))
    assert after["identity"] == read_manifest(clean)["identity"]


def test_resume_grows_but_refuses_other_settings(
    tmp_path: Path, cache: Path, corpus: Path, lm: tuple[Any, Any]
) -> None:
    out = tmp_path / "grow"
    shutil.copytree(cache, out)
    build_cache(_cfg(out, corpus, tokens=3500), model=lm[0], tokenizer=lm[1], progress=False)
    assert [s["tokens"] for s in read_manifest(out)["shards"]] == [700] * 5
    assert torch.equal(_rows(out, KEYS[1])[:3000], _rows(cache, KEYS[1]))
    with pytest.raises(
        ValueError, match=r"different run \(dtype: cache has float32, this run bfloat16"
    ):
        build_cache(_cfg(out, corpus, tokens=3500, dtype="bfloat16"), model=lm[0], tokenizer=lm[1])
    with pytest.raises(ValueError, match="already holds 3,500 tokens, more than the 1,000 asked"):
        build_cache(_cfg(out, corpus, tokens=1000), model=lm[0], tokenizer=lm[1])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no manifest.json"):
        build_cache(_cfg(tmp_path / "other", corpus), model=lm[0], tokenizer=lm[1])


def test_refuses_to_start_without_disk(
    tmp_path: Path, corpus: Path, lm: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        activations.files.shutil,
        "disk_usage",
        lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6),
    )  # type: ignore[attr-defined]
    with pytest.raises(
        RuntimeError, match=r"needs about .* but only 976.6 KB is free.*--dtype bfloat16"
    ):
        build_cache(_cfg(tmp_path / "c", corpus), model=lm[0], tokenizer=lm[1])
    assert not (tmp_path / "c").exists()


def test_corpus_running_out_is_reported(tmp_path: Path, lm: tuple[Any, Any]) -> None:
    (tmp_path / "small.txt").write_text(" ".join(f"w{i}" for i in range(3, 63)))
    with pytest.raises(RuntimeError, match=r"ran out after 60 of 5,000 tokens"):
        build_cache(_cfg(tmp_path / "c", tmp_path / "small.txt", tokens=5000), model=lm[0],
                    tokenizer=lm[1], progress=False)  # fmt: skip


# ---------------------------------------------------------------------------- reading
def _as_rows(batches: list[dict[Any, torch.Tensor]], key: Any) -> list[tuple[float, ...]]:
    return [tuple(r.tolist()) for b in batches for r in b[key]]


def test_shuffle_is_deterministic_and_exact_per_epoch(cache: Path) -> None:
    key = KEYS[0]
    raw = Counter(tuple(r.tolist()) for r in _rows(cache, key))
    assert len(raw) > 2800  # nearly all distinct (a token right after BOS repeats its vector)
    kw: dict[str, Any] = dict(batch_size=256, buffer_size=1000, chunk_size=100)
    loader = CachedActivations(cache, key, **kw)
    stream = list(itertools.islice(loader.batches(), 24))  # 6144 rows: two epochs and a bit
    assert all(b[key].shape == (256, 32) and b[key].dtype == torch.float32 for b in stream)
    rows = _as_rows(stream, key)
    epoch0, epoch1 = rows[:3000], rows[3000:6000]
    assert Counter(epoch0) == raw and Counter(epoch1) == raw  # every vector exactly once per epoch
    assert epoch0 != epoch1  # a new order each epoch
    again = list(itertools.islice(CachedActivations(cache, key, **kw).batches(), 24))
    assert _as_rows(again, key) == rows  # same seed, same batches
    other = list(itertools.islice(CachedActivations(cache, key, seed=1, **kw).batches(), 12))
    assert _as_rows(other, key)[:3000] != epoch0
    # resuming at batch 13 (inside epoch 1, mid-buffer) reads exactly the rest of the stream
    resumed = list(itertools.islice(loader.batches(start=13), 11))
    assert _as_rows(resumed, key) == rows[13 * 256 :]
    finite = list(CachedActivations(cache, key, epochs=1, **kw).batches())
    assert len(finite) == 12 and len(finite[-1][key]) == 3000 - 11 * 256
    assert Counter(_as_rows(finite, key)) == raw


def test_several_keys_share_rows(cache: Path) -> None:
    raw = {key: _rows(cache, key) for key in KEYS}
    index = {tuple(r.tolist()): i for i, r in enumerate(raw[KEYS[0]])}
    loader = CachedActivations(
        cache, KEYS, batch_size=500, buffer_size=700, chunk_size=70, prefetch=2
    )
    assert loader.widths == {KEYS[0]: 32, KEYS[1]: 32, KEYS[2]: 64}
    for batch in itertools.islice(loader.batches(), 7):
        rows = torch.tensor([index[tuple(r.tolist())] for r in batch[KEYS[0]]])
        for key in KEYS[1:]:
            assert torch.equal(batch[key], raw[key][rows])


def test_model_source_matches_cache(cache: Path, corpus: Path, lm: tuple[Any, Any]) -> None:
    model, tok = lm
    source = ModelActivations(model, tok, KEYS, corpus=str(corpus), context_size=T, batch_size=500,
                              model_batch_size=4, buffer_size=3000)  # fmt: skip
    assert source.keys == tuple(KEYS) and source.widths[KEYS[2]] == 64
    first = list(itertools.islice(source.batches(), 9))
    for key in KEYS:  # the first buffer is stream positions 0..2999: the cache's tokens
        assert Counter(_as_rows(first[:6], key)) == Counter(
            tuple(r.tolist()) for r in _rows(cache, key)
        )
    resumed = list(itertools.islice(source.batches(start=4), 5))
    for a, b in zip(resumed, first[4:], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in KEYS)


# ---------------------------------------------------------------------------- clear errors
def test_loader_errors_name_the_file(tmp_path: Path, cache: Path) -> None:
    key = KEYS[0]
    with pytest.raises(ValueError, match=r"no layer 1 resid_pre.*--layers"):
        CachedActivations(cache, (1, "resid_pre"))
    with pytest.raises(
        ValueError, match=r"made from model 'tiny-gemma3' \(gemma3, 3 layers.*not 'gemma-2-2b'"
    ):
        CachedActivations(cache, key, model="gemma-2-2b")
    CachedActivations(cache, key, model="tiny-gemma3")
    with pytest.raises(FileNotFoundError, match=r"manifest.json: not found"):
        CachedActivations(tmp_path, key)

    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    shard = broken / "L00.resid_post" / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    CachedActivations(broken, key, verify=False)  # a size check alone cannot see it
    with pytest.raises(ValueError, match=r"shard-00002.safetensors: sha256 differs.*--verify"):
        CachedActivations(broken, key, verify=True)
    shard.write_bytes(bytes(data[:1000]))
    with pytest.raises(
        ValueError, match=r"shard-00002.safetensors: 1,000 bytes, the manifest says"
    ):
        CachedActivations(broken, key)

    wide = tmp_path / "wide"
    shutil.copytree(cache, wide)
    m = json.loads((wide / "manifest.json").read_text())
    m["identity"]["sites"][0]["width"] = 48
    (wide / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        ValueError,
        match=r"L00.resid_post/shard-00000.safetensors: activations are 700 x 32, the manifest says 700 x 48",
    ):
        CachedActivations(wide, key)


def test_resume_recomputes_a_damaged_shard(
    tmp_path: Path, cache: Path, corpus: Path, lm: tuple[Any, Any]
) -> None:
    out = tmp_path / "damaged"
    shutil.copytree(cache, out)
    shard = out / "L02.attn_z" / "shard-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    build_cache(_cfg(out, corpus), model=lm[0], tokenizer=lm[1], progress=False)
    assert torch.equal(_rows(out, KEYS[2]), _rows(cache, KEYS[2]))


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["cache", "--out", str(tmp_path / "c"), "--dtype", "int8"])
    assert result.exit_code == 2 and "dtype" in result.output and "float32" in result.output
    result = CliRunner().invoke(app, ["cache", "--out", str(tmp_path / "c"), "--tokens", "5X"])
    assert result.exit_code == 2 and "cannot read the count '5X'" in result.output
    assert (
        parse_count("5M") == 5_000_000
        and parse_count("250k") == 250_000
        and parse_count("1.5B") == 1_500_000_000
    )


@pytest.mark.slow
def test_gemma_3_270m_cache_matches_direct_forward(tmp_path: Path) -> None:
    """The real model and tokenizer on the default corpus: BOS/EOS skipped, values equal a forward."""
    try:
        model, tok = load_model("gemma-3-270m")
        iter(iter_documents("default")).__next__()
    except RuntimeError as err:  # no npm/apt for the corpus, or the embedded model will not load
        pytest.skip(f"needs the embedded model and the default corpus: {err}")
    keys = [(1, "resid_post"), (4, "attn_z"), (4, "mlp_out")]
    cfg = CacheConfig(out=tmp_path / "c", model="gemma-3-270m", layers="1,4",
                      sites=["resid_post", "attn_z", "mlp_out"], tokens=1500, context_size=256,
                      batch_size=2, dtype="bfloat16", shard_tokens=1000)  # fmt: skip
    build_cache(cfg, model=model, tokenizer=tok, progress=False)
    m = read_manifest(cfg.out)
    assert m["identity"]["model"]["d_model"] == 640 and m["identity"]["tokenizer"]["skipped_ids"]
    widths = {(s["layer"], s["site"]): s["width"] for s in m["identity"]["sites"]}
    assert widths[4, "attn_z"] == 1024 and widths[1, "resid_post"] == 640
    t = _shards(cfg.out)[0]
    assert t["sequences"][:, 0].eq(tok.bos_token_id).all()
    assert not set(t["token_ids"].tolist()) & set(m["identity"]["tokenizer"]["skipped_ids"])
    direct = collect(model, t["sequences"].long(), keys)
    row_of = {int(i): r for r, i in enumerate(t["sequence_ids"])}
    rows = torch.tensor([row_of[int(i)] for i in t["sequence"]])
    for key in keys:
        want = direct[key][rows, t["position"].long()].bfloat16()
        assert_close(
            _shards(cfg.out, key)[0]["activations"].float(), want.float(), rtol=2e-2, atol=2e-2
        )
    # sequence 0 opens with the first training document: the stored tokens decode back to its text
    first = next(iter(iter_documents("default")))
    assert first.startswith(tok.decode(t["sequences"][0, 1:40].tolist()))


def test_trainer_reads_from_the_model_or_the_cache_alike(
    cache: Path, corpus: Path, lm: tuple[Any, Any], tmp_path: Path
) -> None:
    """One sweep over two sites: streamed from the model (no disk) or read from the cache."""
    from gemmascope.train import SAESpec, TrainConfig, train

    model, tok = lm
    specs = [
        SAESpec(0, "resid_post", 64, "topk", k=4),
        SAESpec(2, "attn_z", 64, "jumprelu", target_l0=4),
    ]
    cfg = TrainConfig(tokens=250 * 6, batch_size=250, lr=1e-3, log_every=2)
    keys = [(0, "resid_post"), (2, "attn_z")]
    streamed = ModelActivations(model, tok, keys, corpus=str(corpus), context_size=T, batch_size=250,
                                model_batch_size=4, buffer_size=3000)  # fmt: skip
    cached = CachedActivations(cache, keys, batch_size=250)
    for name, source in (("stream", streamed), ("cache", cached)):
        saes = train(specs, source.batches, cfg, tmp_path / name, progress=False)
        assert {s.name for s in specs} == set(saes)
        assert saes[specs[1].name].cfg.d_in == 64 and saes[specs[0].name].cfg.d_in == 32
        assert (tmp_path / name / "complete.json").exists()


def test_the_model_runs_under_autocast_only_on_a_gpu_with_a_low_precision_cache():
    from torch import nn

    from gemmascope.activations.stream import model_autocast

    cpu = nn.Linear(2, 2)
    assert isinstance(model_autocast(cpu, "bfloat16"), contextlib.nullcontext)
    if torch.cuda.is_available():
        gpu = nn.Linear(2, 2).cuda()
        assert isinstance(model_autocast(gpu, "bfloat16"), torch.autocast)
        assert isinstance(model_autocast(gpu, "float32"), contextlib.nullcontext)
