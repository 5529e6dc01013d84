"""Publishing: Gemma Scope's layout, the model card, loading back unchanged, the upload call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import build_tiny
from typer.testing import CliRunner

import gemmascope
from gemmascope.evaluate import evaluate_sequences, read_results, write_results
from gemmascope.publish import publish
from gemmascope.sae import SAE, SAEConfig

# (folder name, architecture, layer, site, width)
SUITE = [
    ("a_jumprelu", "jumprelu", 1, "resid_post", 1024),
    ("b_relu", "relu", 2, "mlp_out", 2048),
    ("c_batchtopk", "batchtopk", 1, "resid_post", 2048),
    ("d_topk", "topk", 0, "attn_out", 1024),
]


def _sae(arch: str, layer: int, site: str, width: int, seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(arch, d_in=32, d_sae=width, k=8, layer=layer, site=site, model="gemma-3-270m")  # type: ignore[arg-type]
    sae = SAE(cfg)
    for name, scale in (("W_enc", 0.3), ("W_dec", 0.1), ("b_enc", 0.05), ("b_dec", 0.1)):
        p = getattr(sae, name)
        p.data = torch.randn(p.shape, generator=g) * scale
    sae.threshold.data = torch.rand(width, generator=g) * 0.3
    return sae.eval()


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run folder of four SAEs and real evaluation results of them on the tiny Llama."""
    root = tmp_path_factory.mktemp("publish")
    run = root / "run"
    saes = []
    for seed, (name, arch, layer, site, width) in enumerate(SUITE):
        saes.append(_sae(arch, layer, site, width, seed))
        gemmascope.save(saes[-1], run / name)
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    records = evaluate_sequences(
        build_tiny("llama"), saes, ids, skip_ids=[0, 1, 2], ablations=False
    )
    for r, (name, *_) in zip(records, SUITE, strict=True):
        r.update(source=str(run), sae_id=name)
    write_results(root / "results.json", records, {})
    return run, root / "results.json"


def _card(out: Path) -> tuple[dict[str, Any], str]:
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_layout_card_and_reload(suite: tuple[Path, Path], tmp_path: Path) -> None:
    run, results = suite
    out = publish(run, tmp_path / "out", results=results, saelens=True)
    l0s = {r["sae_id"]: round(r["l0"]) for r in read_results(results)}
    front, body = _card(out)
    assert front["library_name"] == "gemmascope" and front["license"] == "apache-2.0"
    assert front["base_model"] == "google/gemma-3-270m" and "saelens" in front["tags"]
    x = torch.randn(64, 32) * 2
    for name, arch, layer, site, width in SUITE:
        sae_id = f"layer_{layer}/width_{width // 1024}k/average_l0_{l0s[name]}"
        folder = out / site / sae_id
        files = {p.name for p in folder.iterdir()}
        assert files == ({"cfg.json", "sae.safetensors"} if arch == "topk" else {"params.npz"})
        assert f"`{site}/{sae_id}`" in body
        original = gemmascope.load(run / name)
        for copy in (gemmascope.load(out / site, sae_id=sae_id),
                     gemmascope.load(out / "saelens" / site, sae_id=sae_id)):  # fmt: skip
            with torch.no_grad():
                torch.testing.assert_close(copy.encode(x), original.encode(x))
                torch.testing.assert_close(copy(x), original(x))
    published = read_results(out / "eval_results.json")
    assert [(r["source"], r["model"]) for r in published] == [
        (site, "google/gemma-3-270m") for _, _, _, site, _ in SUITE
    ]
    assert str(tmp_path) not in (out / "README.md").read_text()  # no machine paths in the card


def test_upload_calls_the_hub_with_the_folder(
    suite: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict[str, Any]]] = []

    class FakeApi:
        def create_repo(self, repo_id: str, **kw: Any) -> None:
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw: Any) -> Any:
            calls.append(("upload_folder", kw))
            assert (Path(kw["folder_path"]) / "README.md").exists()  # complete before the upload
            return type("Commit", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run, results = suite
    out = publish(run, tmp_path / "out", results=results, repo_id="me/my-saes")
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == {"repo_id": "me/my-saes", "repo_type": "model", "exist_ok": True}
    assert calls[1][1]["folder_path"] == str(out) and calls[1][1]["repo_id"] == "me/my-saes"
    _, body = _card(out)
    assert 'gemmascope.load("me/my-saes", sae_id=' in body

    class Broken(FakeApi):
        def upload_folder(self, **kw: Any) -> Any:
            raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", Broken)
    with pytest.raises(RuntimeError, match=r"me/my-saes: uploading .* failed \(ConnectionError"):
        publish(run, tmp_path / "out2", results=results, repo_id="me/my-saes")
    assert (tmp_path / "out2" / "README.md").exists()  # the local copy stays


def test_refusals(suite: tuple[Path, Path], tmp_path: Path) -> None:
    run, results = suite
    records = read_results(results)
    write_results(tmp_path / "partial.json", records[:-1], {})
    with pytest.raises(ValueError, match=r"d_topk\]: .* holds 0 results for this SAE"):
        publish(run, tmp_path / "o", results=tmp_path / "partial.json")
    wrong = [dict(r, layer=5) if r["sae_id"] == "b_relu" else r for r in records]
    write_results(tmp_path / "wrong.json", wrong, {})
    with pytest.raises(ValueError, match=r"b_relu\]: the result in .* describes another SAE"):
        publish(run, tmp_path / "o", results=tmp_path / "wrong.json")
    same = [dict(r, l0=10.2 if r["sae_id"] == "a_jumprelu" else 9.9) for r in records]
    clash = tmp_path / "clash"
    for name in ("a_jumprelu", "c_batchtopk"):
        gemmascope.save(_sae("jumprelu", 1, "resid_post", 1024, 0), clash / name)
    write_results(tmp_path / "same.json", [dict(r, source=str(clash), width=1024, architecture="jumprelu")
                                           for r in same if r["sae_id"] in ("a_jumprelu", "c_batchtopk")], {})  # fmt: skip
    with pytest.raises(
        ValueError, match="would both be published as resid_post/layer_1/width_1k/average_l0_10"
    ):
        publish(clash, tmp_path / "o", results=tmp_path / "same.json")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        publish(run, tmp_path / "full", results=results)
    with pytest.raises(ValueError, match="would replace the suite"):
        publish(run, run.parent, results=results, overwrite=True)
    assert not (tmp_path / "o").exists()


def test_base_model_must_be_a_hub_id(suite: tuple[Path, Path], tmp_path: Path) -> None:
    run, results = suite
    local = tmp_path / "local"
    records = []
    for r in read_results(results)[:1]:
        sae = gemmascope.load(run, sae_id=r["sae_id"])
        sae.cfg.model = str(tmp_path / "my-model")
        gemmascope.save(sae, local / r["sae_id"])
        records.append(dict(r, source=str(local)))
    write_results(tmp_path / "r.json", records, {})
    with pytest.raises(ValueError, match="is not a Hugging Face hub id; pass base_model"):
        publish(local, tmp_path / "o", results=tmp_path / "r.json")
    out = publish(local, tmp_path / "o", results=tmp_path / "r.json", base_model="me/base")
    assert _card(out)[0]["base_model"] == "me/base"
    assert str(tmp_path) not in (out / "README.md").read_text()


def test_cli_publish(suite: tuple[Path, Path], tmp_path: Path) -> None:
    from gemmascope.cli import app

    run, results = suite
    args = ["publish", str(run), str(tmp_path / "out"), "--results", str(results)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["results"]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "pass --overwrite" in again.output
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
