"""gemmascope.io: Gemma Scope npz, our own folders, the hub path and every error, on real files in
the real layouts written into tmp_path. SAELens interop is in test_io_saelens.py."""

from __future__ import annotations

import fnmatch
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import UNPICKLED, Exploit
from typer.testing import CliRunner

import gemmascope
from gemmascope import io
from gemmascope.cli import app
from gemmascope.io.gemmascope_npz import describe
from gemmascope.sae import SAE, SAEConfig

D_IN, WIDTH = 16, 16384  # Gemma Scope's width_16k is 16384 latents; d_in kept small
SAE_ID = "layer_3/width_16k/average_l0_42"
OTHER_ID = "layer_12/width_16k/average_l0_82"


def gemma_arrays(d_in: int = D_IN, d_sae: int = WIDTH, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays with Gemma Scope's names, shapes and positive thresholds."""
    g = np.random.default_rng(seed)
    return {
        "W_enc": (g.standard_normal((d_in, d_sae)) * 0.3).astype(np.float32),
        "W_dec": (g.standard_normal((d_sae, d_in)) * 0.3).astype(np.float32),
        "b_enc": (g.standard_normal(d_sae) * 0.1).astype(np.float32),
        "b_dec": g.standard_normal(d_in).astype(np.float32),
        "threshold": (np.abs(g.standard_normal(d_sae)) * 0.3 + 0.05).astype(np.float32),
    }


def write_npz(file: Path, arrays: dict[str, np.ndarray]) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(file, **arrays)
    return file


def gemma_repo(root: Path, name: str = "gemma-scope-2b-pt-res") -> Path:
    """A folder laid out like the hub repo google/<name>, with two SAEs."""
    repo = root / "google" / name
    write_npz(repo / SAE_ID / "params.npz", gemma_arrays(seed=0))
    write_npz(repo / OTHER_ID / "params.npz", gemma_arrays(seed=1))
    return repo


def numpy_jumprelu(x: np.ndarray, a: dict[str, np.ndarray]) -> np.ndarray:
    pre = x @ a["W_enc"] + a["b_enc"]
    return pre * (pre > a["threshold"])


def random_sae(arch: str, *, d_in: int = 12, d_sae: int = 48, seed: int = 0, **cfg) -> SAE:
    g = torch.Generator().manual_seed(seed)
    c = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=5 if "topk" in arch else None, **cfg)
    arrays = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) * 0.4,
        "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.4,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "b_dec": torch.randn(d_in, generator=g),
        "threshold": torch.rand(d_sae, generator=g) * 0.5 + 0.05,
    }
    return SAE.from_arrays(c, arrays).eval()


def acts(d_in: int, n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed)) * 2


# ---------------------------------------------------------------- Gemma Scope params.npz


def test_gemmascope_npz_matches_numpy_reference_and_path_fills_config(tmp_path: Path) -> None:
    repo = gemma_repo(tmp_path)
    sae = gemmascope.load(repo, SAE_ID)
    x = acts(D_IN).numpy()
    ref = numpy_jumprelu(x, gemma_arrays(seed=0))
    got = sae.encode(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert (got != 0).any() and (got == 0).any()
    c = sae.cfg
    assert (c.architecture, c.d_in, c.d_sae) == ("jumprelu", D_IN, WIDTH)
    assert (c.model, c.layer, c.site) == ("google/gemma-2-2b", 3, "resid_post")
    assert c.hook_name == "blocks.3.hook_resid_post" and not c.apply_b_dec_to_input
    assert c.extra["average_l0"] == 42 and c.extra["repo_id"] == "google/gemma-scope-2b-pt-res"
    assert not sae.training
    # The file itself, and its folder, load the same SAE.
    for source in (repo / SAE_ID / "params.npz", repo / SAE_ID):
        assert io.load(source).cfg == c


def test_list_sae_ids_in_natural_order(tmp_path: Path) -> None:
    assert io.list_sae_ids(gemma_repo(tmp_path)) == [SAE_ID, OTHER_ID]
    assert gemmascope.list_sae_ids(tmp_path / "google" / "gemma-scope-2b-pt-res" / SAE_ID) == ["."]


@pytest.mark.parametrize(
    "repo, model, site, hook",
    [
        ("gemma-scope-2b-pt-mlp", "google/gemma-2-2b", "mlp_out", "blocks.7.hook_mlp_out"),
        ("gemma-scope-9b-it-res", "google/gemma-2-9b-it", "resid_post", "blocks.7.hook_resid_post"),
        ("gemma-scope-27b-pt-att", "google/gemma-2-27b", "attn_z", "blocks.7.attn.hook_z"),
        (
            "models--google--gemma-scope-9b-pt-att",
            "google/gemma-2-9b",
            "attn_z",
            "blocks.7.attn.hook_z",
        ),
    ],
)
def test_repo_names_map_to_model_and_site(repo: str, model: str, site: str, hook: str) -> None:
    info = describe(Path(repo) / "layer_7/width_131k/average_l0_10/params.npz")
    assert (info["model"], info["layer"], info["site"], info["hook_name"]) == (model, 7, site, hook)
    assert info["extra"]["width"] == "131k" and info["extra"]["average_l0"] == 10


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "batchtopk"])
def test_npz_round_trip_folds_scale_and_b_dec(tmp_path: Path, arch: str) -> None:
    sae = random_sae(arch, apply_b_dec_to_input=True, input_scale=4.0)
    x = acts(12)
    out = io.save(sae, tmp_path / "a" / "params.npz", format="npz")
    back = io.load(out)
    assert back.cfg.architecture == "jumprelu"  # Gemma Scope's only rule; relu is threshold 0
    assert not back.cfg.apply_b_dec_to_input and back.cfg.input_scale == 1.0
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5)
    assert sae.cfg.input_scale == 4.0 and sae.cfg.apply_b_dec_to_input  # the original is untouched


def test_gemmascope_npz_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    sae = io.load(gemma_repo(tmp_path), SAE_ID)
    out = io.save(
        sae, tmp_path / "copy" / "google" / "gemma-scope-2b-pt-res" / SAE_ID, format="npz"
    )
    assert out.name == "params.npz"
    back = io.load(out)
    for name, t in sae.state_arrays().items():
        torch.testing.assert_close(back.state_arrays()[name], t, rtol=0, atol=1e-6)
    assert back.cfg == sae.cfg


def test_npz_refuses_topk(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"topk SAE cannot be saved as Gemma Scope params\.npz"):
        io.save(random_sae("topk"), tmp_path / "t.npz", format="npz")
    assert not (tmp_path / "t.npz").exists()


# ---------------------------------------------------------------- our own format


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "topk", "batchtopk"])
def test_native_round_trip_is_lossless(tmp_path: Path, arch: str) -> None:
    sae = random_sae(
        arch,
        apply_b_dec_to_input=True,
        input_scale=2.5,
        model="gemma-3-270m",
        layer=4,
        site="mlp_out",
        dataset="wiki",
        context_size=128,
        tokens_trained=10_000,
        extra={"lr": 3e-4, "note": ["a", 1]},
    )
    out = gemmascope.save(sae, tmp_path / "sae")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae.safetensors"]
    back = io.load(out)
    assert back.cfg == sae.cfg
    for name, t in sae.state_arrays().items():
        assert torch.equal(back.state_arrays()[name], t), name
    x = acts(12)
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)


def test_bfloat16_round_trip_and_dtype_override(tmp_path: Path) -> None:
    sae = random_sae("jumprelu", dtype="bfloat16")
    assert sae.dtype == torch.bfloat16
    back = io.load(io.save(sae, tmp_path / "bf16"))
    assert back.cfg.dtype == "bfloat16" and back.dtype == torch.bfloat16
    for name, t in sae.state_arrays().items():
        assert torch.equal(back.state_arrays()[name], t), name
    wide = io.load(tmp_path / "bf16", dtype=torch.float32)
    assert wide.cfg.dtype == "float32" and wide.dtype == torch.float32
    torch.testing.assert_close(wide.W_enc, sae.W_enc.float(), rtol=0, atol=0)


def test_save_replaces_an_sae_folder_but_not_other_folders(tmp_path: Path) -> None:
    out = io.save(random_sae("relu", seed=0), tmp_path / "s")
    io.save(random_sae("relu", seed=1), out)  # overwriting an SAE folder is fine
    torch.testing.assert_close(io.load(out).W_enc, random_sae("relu", seed=1).W_enc)
    keep = tmp_path / "home"
    keep.mkdir()
    (keep / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match=r"home: exists and holds \['thesis.tex'\].*not SAE files"):
        io.save(random_sae("relu"), keep)
    assert (keep / "thesis.tex").read_text() == "precious"


# ---------------------------------------------------------------- hub


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Replace the two network calls with copies from folders laid out like the hub repos."""
    import huggingface_hub

    repos = {"google/gemma-scope-2b-pt-res": gemma_repo(tmp_path / "hub")}
    repos["someone/saes"] = tmp_path / "hub" / "someone" / "saes"  # SAELens layout, two SAEs
    for layer in (2, 10):
        io.save(
            random_sae("topk", seed=layer, layer=layer, site="resid_post"),
            repos["someone/saes"] / f"blocks.{layer}.hook_resid_post",
            format="saelens",
        )
    (repos["someone/saes"] / "README.md").write_text("SAEs")
    repos["someone/one"] = io.save(random_sae("relu", seed=5), tmp_path / "hub" / "someone" / "one")
    calls: dict[str, list] = {"list": [], "download": []}

    def list_repo_files(repo_id: str, **_: object) -> list[str]:
        calls["list"].append(repo_id)
        if repo_id not in repos:
            raise ConnectionError(f"cannot reach the hub for {repo_id}")
        return sorted(
            p.relative_to(repos[repo_id]).as_posix()
            for p in repos[repo_id].rglob("*")
            if p.is_file()
        )

    def snapshot_download(repo_id: str, *, allow_patterns: list[str], **_: object) -> str:
        calls["download"].append((repo_id, list(allow_patterns)))
        dest = tmp_path / "cache" / f"snapshot-{len(calls['download'])}"  # no repo name in it
        for rel in list_repo_files(repo_id):
            if any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(repos[repo_id] / rel, dest / rel)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_repo_downloads_only_the_chosen_sae(tmp_path: Path, fake_hub: dict[str, list]) -> None:
    sae = gemmascope.load("google/gemma-scope-2b-pt-res", SAE_ID)
    assert fake_hub["download"] == [("google/gemma-scope-2b-pt-res", [f"{SAE_ID}/params.npz"])]
    local = io.load(tmp_path / "hub" / "google" / "gemma-scope-2b-pt-res", SAE_ID)
    assert sae.cfg == local.cfg and sae.cfg.model == "google/gemma-2-2b"
    torch.testing.assert_close(sae.W_enc, local.W_enc, rtol=0, atol=0)
    assert io.list_sae_ids("google/gemma-scope-2b-pt-res") == [SAE_ID, OTHER_ID]


def test_hub_saelens_and_single_sae_repos(fake_hub: dict[str, list]) -> None:
    assert io.list_sae_ids("someone/saes") == [
        "blocks.2.hook_resid_post",
        "blocks.10.hook_resid_post",
    ]
    sae = io.load("someone/saes", "blocks.10.hook_resid_post")
    assert (sae.cfg.architecture, sae.cfg.layer) == ("topk", 10)
    torch.testing.assert_close(sae.W_enc, random_sae("topk", seed=10).W_enc, rtol=0, atol=0)
    wanted = sorted(fake_hub["download"][-1][1])
    assert wanted == [
        "blocks.10.hook_resid_post/cfg.json",
        "blocks.10.hook_resid_post/sae_weights.safetensors",
    ]
    one = io.load("someone/one")  # the repo root is the SAE: no sae_id needed
    assert sorted(fake_hub["download"][-1][1]) == ["cfg.json", "sae.safetensors"]
    torch.testing.assert_close(one.W_enc, random_sae("relu", seed=5).W_enc, rtol=0, atol=0)


def test_hub_errors_name_the_repo(fake_hub: dict[str, list]) -> None:
    with pytest.raises(
        ValueError, match=r"google/gemma-scope-2b-pt-res: holds 2 SAEs; pass sae_id"
    ):
        io.load("google/gemma-scope-2b-pt-res")
    with pytest.raises(RuntimeError, match=r"someone/missing: not a local path.*ConnectionError"):
        io.load("someone/missing")
    assert fake_hub["download"] == []


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope/sae: no such file or folder"):
        io.load(tmp_path / "nope" / "sae")


def test_folder_in_no_format_lists_formats_and_files(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError) as e:
        io.load(tmp_path / "junk")
    msg = str(e.value)
    assert "junk: no SAE found" in msg and "notes.txt" in msg
    assert (
        "params.npz" in msg and "sae_weights.safetensors" in msg and '"format": "gemmascope"' in msg
    )


def test_missing_array_names_file_and_array(tmp_path: Path) -> None:
    arrays = gemma_arrays(d_sae=4096)
    del arrays["threshold"]
    f = write_npz(tmp_path / "layer_0/width_4k/average_l0_5/params.npz", arrays)
    with pytest.raises(ValueError, match=rf"{re.escape(str(f))}: missing array 'threshold'"):
        io.load(f)


def test_wrong_shape_names_file_array_and_expected_shape(tmp_path: Path) -> None:
    arrays = gemma_arrays(d_sae=4096)
    arrays["b_enc"] = arrays["b_enc"][:100]
    f = write_npz(tmp_path / "layer_0/width_4k/average_l0_5/params.npz", arrays)
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(f))}: array 'b_enc' has shape \(100,\), expected \(4096,\)",
    ):
        io.load(f)


def test_width_in_path_must_match_arrays(tmp_path: Path) -> None:
    f = write_npz(tmp_path / "layer_0/width_16k/average_l0_5/params.npz", gemma_arrays(d_sae=64))
    with pytest.raises(ValueError, match=r"width_16k \(16384 latents\) but W_enc has 64"):
        io.load(f)


def test_sae_id_required_when_folder_holds_several(tmp_path: Path) -> None:
    repo = gemma_repo(tmp_path)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(repo))}: holds 2 SAEs; pass sae_id.*{SAE_ID}"
    ):
        io.load(repo)


def test_unknown_sae_id_lists_close_ones(tmp_path: Path) -> None:
    repo = gemma_repo(tmp_path)
    with pytest.raises(
        ValueError,
        match=rf"no SAE with sae_id 'layer_3/width_16k/average_l0_41'; close ones: \['{SAE_ID}'",
    ):
        io.load(repo, "layer_3/width_16k/average_l0_41")


def test_pickled_npz_is_refused_not_unpickled(tmp_path: Path) -> None:
    arrays: dict[str, np.ndarray] = dict(gemma_arrays(d_sae=4096))
    arrays["threshold"] = np.array([Exploit()] * 4096, dtype=object)
    f = tmp_path / "layer_0/width_4k/average_l0_5/params.npz"
    f.parent.mkdir(parents=True)
    np.savez(f, **arrays)
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(f))}: array 'threshold' holds Python objects.*refusing to unpickle",
    ):
        io.load(f)
    assert UNPICKLED == []


def test_untagged_cfg_json_is_neither_ours_nor_sparsify(tmp_path: Path) -> None:
    out = io.save(random_sae("topk"), tmp_path / "layers.6")
    (out / "cfg.json").write_text('{"d_sae": 48}')  # no "format" tag, no sparsify `d_in` + `k`
    with pytest.raises(ValueError, match=r'cfg.json: expected "format": "gemmascope".*sparsify'):
        io.load(out)


def test_unknown_save_format(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown format 'pt'; choose one of \['npz', 'saelens', 'gemmascope', 'sparsify'",
    ):
        io.save(random_sae("relu"), tmp_path / "x", format="pt")


# ---------------------------------------------------------------- CLI


def test_cli_sae_info_and_list_saes(tmp_path: Path) -> None:
    repo = gemma_repo(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["list-saes", str(repo)])
    assert r.exit_code == 0, r.output
    assert r.output.split() == [SAE_ID, OTHER_ID]
    r = runner.invoke(app, ["sae-info", str(repo), "--sae-id", SAE_ID])
    assert r.exit_code == 0, r.output
    assert "google/gemma-2-2b" in r.output and "resid_post" in r.output and "16384" in r.output
    r = runner.invoke(app, ["sae-info", str(repo)])
    assert r.exit_code == 2 and "pass sae_id" in r.output


def test_published_layout_tells_the_site(tmp_path):
    """`gemmascope publish` writes {site}/layer_L/width_W/average_l0_N/params.npz: the site is read back."""
    import gemmascope
    from gemmascope.sae import SAE, SAEConfig

    sae = SAE(SAEConfig("jumprelu", d_in=8, d_sae=16))
    folder = tmp_path / "mlp_out" / "layer_3" / "width_16" / "average_l0_5"
    gemmascope.save(sae, folder / "params.npz", format="npz")
    loaded = gemmascope.load(tmp_path / "mlp_out", sae_id="layer_3/width_16/average_l0_5")
    assert (loaded.cfg.layer, loaded.cfg.site) == (3, "mlp_out")
