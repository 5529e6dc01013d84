"""Gemma Scope 2 examples.safetensors -> feature index: a file written in the release's layout
(tensor names, shapes and dtypes as public code reading the released files checks them) is
imported, and every context, density and logit-lens entry is compared with what the file says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB
from safetensors.torch import save_file
from test_index import D_SAE, make_assets, random_sae
from typer.testing import CliRunner

import gemmascope
from gemmascope.cli import app
from gemmascope.explore.examples import import_examples, read_layout
from gemmascope.explore.indexdb import IndexDB

E, LENS, N, T, TOP_K, W = 12, 4, 6, 16, 5, 3
EMPTY = 7
"""A latent with no stored example (every slot unused)."""


def examples_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors laid out as Gemma Scope 2's (fewer slots and a smaller corpus), in no order: distinct
    positions per latent, even latents with three unused slots (seq_ids -1), latent 7 with none."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.stack([torch.randperm(N * T, generator=g)[:E] for _ in range(D_SAE)])  # (F, E)
    seq, pos = flat // T, (flat % T).int()
    acts = torch.rand(D_SAE, E, generator=g) * 5 + 0.1
    seq[::2, -3:], acts[::2, -3:] = -1, 0.0
    seq[EMPTY], acts[EMPTY] = -1, 0.0
    freq = torch.rand(D_SAE, generator=g, dtype=torch.float64) / 10
    freq[EMPTY] = 0.0
    return {
        "activations": acts, "seq_ids": seq, "positions": pos,
        "tokens": torch.randint(3, VOCAB, (N, T), generator=g, dtype=torch.int32),
        "top_tokens": torch.randint(3, VOCAB, (D_SAE, LENS), generator=g, dtype=torch.int32),
        "top_logits": torch.randn(D_SAE, LENS, generator=g),
        "bottom_tokens": torch.randint(3, VOCAB, (D_SAE, LENS), generator=g, dtype=torch.int32),
        "bottom_logits": torch.randn(D_SAE, LENS, generator=g),
        "feature_frequencies": freq, "logit_effects": torch.randn(D_SAE, E, generator=g),
    }  # fmt: skip


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Gemma Scope 2 SAE folder (params.safetensors, config.json, examples.safetensors)."""
    assets = make_assets(tmp_path_factory.mktemp("examples"))
    folder = assets["dir"] / "resid_post" / "layer_1_width_48_l0_small"
    gemmascope.save(assets["sae"], folder, format="gemmascope2")
    tensors = examples_tensors()
    save_file(tensors, str(folder / "examples.safetensors"))
    return {**assets, "folder": folder, "tensors": tensors}


def run(release: dict[str, Any], out: Path, path: Path | None = None, **kw: Any) -> Path:
    path = path or release["folder"] / "examples.safetensors"
    model = str(release["dir"] / "model")
    tok = release["tokenizer"]
    return import_examples(
        path, out, loaded_tokenizer=tok, model=model, top_k=TOP_K, window=W, **kw
    )


def test_contexts_density_and_lens_are_the_file(release: dict[str, Any], tmp_path: Path) -> None:
    db = IndexDB(run(release, tmp_path / "index.sqlite"))
    x, tok = release["tensors"], release["tokenizer"]
    assert db.n_features == D_SAE
    for fid in range(D_SAE):
        f = db.feature(fid)
        assert f is not None
        ok = x["seq_ids"][fid] >= 0
        order = x["activations"][fid].where(ok, -1.0).argsort(descending=True)[: int(ok.sum())]
        assert f["density"] == float(x["feature_frequencies"][fid])
        assert f["max_act"] == pytest.approx(float(x["activations"][fid].where(ok, 0).max()))
        assert (f["fired"], f["histogram"], f["bands"]) == (0, {"hi": 0.0, "counts": []}, [])
        assert len(f["top_contexts"]) == min(TOP_K, int(ok.sum()))
        for c, j in zip(f["top_contexts"], order.tolist(), strict=False):
            check_context(c, x, fid, j, tok)
        for side, descending in (("top", True), ("bottom", False)):
            logits = x[f"{side}_logits"][fid]
            ranked = logits.argsort(descending=descending)
            got = f["logit_lens"][side]
            assert [t["id"] for t in got] == x[f"{side}_tokens"][fid][ranked].tolist()
            assert [t["value"] for t in got] == pytest.approx(logits[ranked].tolist(), rel=1e-3)
            assert [t["text"] for t in got] == [tok.decode([t["id"]]) for t in got]
    assert db.feature(EMPTY)["top_contexts"] == []  # type: ignore[index]


def check_context(
    c: dict[str, Any], x: dict[str, torch.Tensor], fid: int, j: int, tok: Any
) -> None:
    """One stored context against example `j` of latent `fid`: its place, its window of tokens,
    and the window's activations (the latent's other examples there, 0 elsewhere)."""
    s, p = int(x["seq_ids"][fid, j]), int(x["positions"][fid, j])
    assert (c["sequence"], c["position"]) == (s, p)
    assert c["value"] == pytest.approx(float(x["activations"][fid, j]))
    lo = max(p - W, 0)
    ids = x["tokens"][s, lo : p + W + 1].tolist()
    assert [t["id"] for t in c["tokens"]] == ids and c["peak"] == p - lo
    assert [t["text"] for t in c["tokens"]] == [tok.decode([i]) for i in ids]
    here = x["seq_ids"][fid] == s
    positions, acts = x["positions"][fid][here].tolist(), x["activations"][fid][here].tolist()
    known = dict(zip(positions, acts, strict=True))
    want = [known.get(q, 0.0) for q in range(lo, lo + len(ids))]
    assert c["acts"] == pytest.approx(want, rel=1e-3)


def test_meta_says_where_and_what_is_missing(release: dict[str, Any], tmp_path: Path) -> None:
    meta = IndexDB(run(release, tmp_path / "index.sqlite")).meta
    folder = release["folder"]
    assert (meta["layer"], meta["site"], meta["d_sae"]) == (1, "resid_post", D_SAE)
    assert meta["sae_source"] == str(folder.resolve()) and meta["sae_name"] == folder.name
    assert meta["model"] == str((release["dir"] / "model").resolve())
    assert meta["sae_sha256"] == release["sae"].sha256()
    sizes = (meta["sequences"], meta["context_size"], meta["top_k"], meta["window"])
    assert sizes == (N, T, TOP_K, W)
    assert meta["tokens_indexed"] == 0 and meta["bands"] == 0
    assert {"fired", "tokens_indexed", "histogram", "bands"} <= set(meta["not_derived"])
    assert meta["examples_unread"] == ["logit_effects"]


def test_layout_is_read_from_the_header(release: dict[str, Any]) -> None:
    layout = read_layout(release["folder"] / "examples.safetensors")
    assert (layout.n_features, layout.n_examples, layout.lens_k) == (D_SAE, E, LENS)
    assert (layout.n_sequences, layout.context_size, layout.extra) == (N, T, ("logit_effects",))


def bad_file(tmp_path: Path, **changes: torch.Tensor | None) -> Path:
    tensors = {**examples_tensors(), **changes}
    path = tmp_path / "examples.safetensors"
    save_file({k: v for k, v in tensors.items() if v is not None}, str(path))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokens": None}, r"no tensor \['tokens'\]"),
        ({"seq_ids": torch.zeros(D_SAE, E + 1, dtype=torch.int64)}, r"`seq_ids` is \[48, 13\]"),
        ({"feature_frequencies": torch.zeros(D_SAE + 1)}, "`feature_frequencies` is"),
        ({"top_tokens": torch.zeros(D_SAE, LENS)}, "`top_tokens` is F32, expected int"),
        ({"tokens": torch.full((N, T), VOCAB + 5, dtype=torch.int32)}, "tokenizer has 64 tokens"),
        ({"seq_ids": torch.full((D_SAE, E), N)}, "outside `tokens`"),
    ],
)
def test_a_file_not_in_the_layout_is_refused(
    release: dict[str, Any], tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = bad_file(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        run(release, tmp_path / "index.sqlite", path=path, sae=str(release["folder"]))
    assert not (tmp_path / "index.sqlite").exists()


def test_other_bad_input_is_refused(release: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "index.sqlite"
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(release, out, path=tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(ValueError, match="not a safetensors file"):
        run(release, out, path=tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="holds 48 latents but the SAE"):
        run(release, out, loaded_sae=random_sae(d_sae=32))
    out.write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(release, out)
    assert out.read_text() == "keep me"
    run(release, out, overwrite=True)
    assert IndexDB(out).n_features == D_SAE


def test_cli_loads_the_sae_beside_the_file(release: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "index.sqlite"
    args = ["import-examples", str(release["folder"] / "examples.safetensors"), "--out", str(out),
            "--model", str(release["dir"] / "model"), "--top-k", "2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert IndexDB(out).meta["top_k"] == 2 and "gemmascope explore" in result.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output


def test_the_explorer_shows_an_imported_release(release: dict[str, Any], tmp_path: Path) -> None:
    """A downloaded release is browsable without re-indexing, and says what its file lacks."""
    from fastapi.testclient import TestClient

    from gemmascope.explore.app import create_app

    client = TestClient(create_app(run(release, tmp_path / "index.sqlite")),
                        base_url="http://127.0.0.1")  # fmt: skip
    key = client.get("/api/saes").json()["saes"][0]["key"]
    assert client.get(f"/sae/{key}").status_code == 200
    page = client.get(f"/sae/{key}/features/0")
    assert page.status_code == 200
    assert "as the imported file gives it" in page.text and "fired on 0 of 0" not in page.text
    assert "imported from a file of top examples" in page.text
