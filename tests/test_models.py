"""Model loading, shape facts, layer selections and site checks; one slow test on the real Gemma 3."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, GPTNeoXConfig
from typer.testing import CliRunner

from gemmascope import models
from gemmascope.cli import app
from gemmascope.hooks import collect, run_from
from gemmascope.models import (
    EMBEDDED_DEFAULT,
    SITES,
    cache_dir,
    check_site,
    load_model,
    model_info,
    parse_layers,
)

EXPECTED = {  # family: (n_layers, d_model, n_heads, head_dim)
    "gemma2": (3, 32, 4, 16),
    "gemma3": (3, 32, 4, 16),
    "llama": (3, 32, 4, 8),
    "qwen2": (3, 32, 4, 8),
    "gpt2": (3, 32, 4, 8),
}


def test_model_info(tiny: Any) -> None:
    info = model_info(tiny)
    assert (info.n_layers, info.d_model, info.n_heads, info.head_dim) == EXPECTED[info.family]
    assert info.site_width("attn_z") == info.n_heads * info.head_dim
    assert {info.site_width(s) for s in SITES if s != "attn_z"} == {info.d_model}


def test_unknown_family_lists_supported() -> None:
    config = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        ValueError, match=r"unsupported model family 'gpt_neox' .*supported: \['gemma2'"
    ):
        model_info(model)


def test_unknown_site_width(tiny_gemma3: Any) -> None:
    info = model_info(tiny_gemma3)
    with pytest.raises(ValueError, match=r"unknown site 'z'; choose one of \['resid_pre'"):
        info.site_width("z")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        ("0-5", [0, 1, 2, 3, 4, 5]),
        ("3,5,1", [1, 3, 5]),
        ("2-4,0", [0, 2, 3, 4]),
    ],
)
def test_parse_layers(spec: str, expected: list[int]) -> None:
    assert parse_layers(spec, 6) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0-6", r"layer 6 in '0-6' is out of range; this model has layers 0\.\.5"),
        ("7", r"layer 7 in '7' is out of range"),
        ("4-2", r"runs backwards; write `2-4`"),
        ("two", r"bad layer selection 'two' at 'two'; use `all`"),
        ("1,,2", r"bad layer selection '1,,2' at ''"),
        ("-1", r"bad layer selection '-1'"),
    ],
)
def test_parse_layers_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_layers(spec, 6)


def test_check_site(make_tiny: Callable[[str], Any]) -> None:
    model = make_tiny("gpt2")
    check_site(model, 2, "attn_z")
    with pytest.raises(ValueError, match=r"unknown site 'resid'; choose one of \['resid_pre', "):
        check_site(model, 0, "resid")
    with pytest.raises(ValueError, match=r"layer 3 is out of range; this model has layers 0\.\.2"):
        check_site(model, 3, "resid_post")
    with pytest.raises(ValueError, match=r"layer -1 is out of range"):
        check_site(model, -1, "resid_post")


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GEMMASCOPE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GEMMASCOPE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "gemmascope"


def test_load_local_folder(tiny_folder: Path, make_tiny: Callable[[str], Any]) -> None:
    model, tokenizer = load_model(str(tiny_folder))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    ids = tokenizer("w3 w4 w5", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 4, 5]]
    with torch.no_grad():
        assert_close(model(ids).logits, make_tiny("llama")(ids).logits)
    half, _ = load_model(str(tiny_folder), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"no model folder at '.*nowhere'; pass an existing folder"
    ):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(
        RuntimeError, match=r"(?s)could not load model '.*'.*written by `save_pretrained`"
    ):
        load_model(str(tmp_path))  # a folder, but no config.json in it
    with pytest.raises(ValueError, match=r"unknown device 'gpu0'; use `cpu`"):
        load_model(str(tmp_path), device="gpu0")


def test_embedded_converts_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The cached copy is reused while its manifest matches, and rebuilt when it does not."""
    monkeypatch.setenv("GEMMASCOPE_CACHE", str(tmp_path))
    calls: list[Path] = []

    def fake_convert(pkg: Any, folder: Path, manifest: dict[str, str]) -> None:
        calls.append(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / models._MANIFEST).write_text(
            json.dumps({**manifest, "transformers_version": "x"})
        )

    monkeypatch.setattr(models, "_convert_embedded", fake_convert)
    first = models._embedded_folder()
    assert first == tmp_path / "models" / EMBEDDED_DEFAULT
    assert models._embedded_folder() == first and len(calls) == 1
    stale = json.loads((first / models._MANIFEST).read_text()) | {"source_version": "0.0.0"}
    (first / models._MANIFEST).write_text(json.dumps(stale))
    models._embedded_folder()
    assert len(calls) == 2


def test_cli_model(tiny_folder: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["model", "--model", str(tiny_folder)])
    assert result.exit_code == 0, result.output
    assert "family llama, 3 layers" in result.output and "attn_z" in result.output
    args = ["model", "--model", str(tiny_folder), "--text", "w3 w9 w20", "--layer", "1"]
    result = runner.invoke(app, [*args, "--site", "attn_z"])
    assert result.exit_code == 0, result.output
    assert "(1, 3, 32)" in result.output and "norm mean" in result.output
    result = runner.invoke(app, [*args, "--site", "resid"])
    assert result.exit_code == 2 and "unknown --site 'resid'" in result.output
    result = runner.invoke(
        app, ["model", "--model", str(tiny_folder), "--text", "w3", "--layer", "9"]
    )
    assert result.exit_code == 2 and "layer 9 is out of range" in result.output


@pytest.mark.slow
def test_embedded_gemma3_270m() -> None:
    t0 = time.perf_counter()
    model, tokenizer = load_model()
    t1 = time.perf_counter()
    load_model()  # second load: always from the converted copy in the cache
    t2 = time.perf_counter()
    print(f"\nload_model(): first {t1 - t0:.1f}s, second {t2 - t1:.1f}s")
    info = model_info(model)
    assert (info.family, info.n_layers, info.d_model) == ("gemma3", 18, 640)
    assert (info.n_heads, info.head_dim, info.site_width("attn_z")) == (4, 256, 1024)
    assert t2 - t1 < 30, "the cached copy should load in seconds"

    batch = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    acts = collect(model, batch.input_ids, [(6, "resid_post"), (6, "attn_z")])
    assert_close(acts[6, "resid_post"], out.hidden_states[7])
    assert acts[6, "attn_z"].shape == (1, batch.input_ids.shape[1], 1024)
    assert_close(run_from(model, 12, out.hidden_states[12]), out.logits, atol=1e-4, rtol=1e-4)
