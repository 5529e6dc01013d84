"""Gemma Scope 2 folders (`params.safetensors` + `config.json`), checked against SAELens' own Gemma 3
loader (`gemma_3_sae_huggingface_loader`), with its two hub calls served from tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import SAE as LensSAE
from sae_lens.loading import pretrained_sae_loaders as loaders
from safetensors.numpy import save_file
from safetensors.torch import load_file

from gemmascope import io
from gemmascope.clt import CLT
from gemmascope.sae import SAE, SAEConfig

D, M = 16, 64
REPO = "google/gemma-scope-2-270m-pt"
SAE_ID = "resid_post/layer_6_width_16k_l0_small"
TOL = {"rtol": 1e-5, "atol": 1e-5}


def gs2_arrays(d_sae: int = M) -> dict[str, np.ndarray]:
    g = np.random.default_rng(0)
    return {
        "w_enc": (g.standard_normal((D, d_sae)) * 0.3).astype(np.float32),
        "w_dec": (g.standard_normal((d_sae, D)) * 0.3).astype(np.float32),
        "b_enc": (g.standard_normal(d_sae) * 0.1).astype(np.float32),
        "b_dec": g.standard_normal(D).astype(np.float32),
        "threshold": (np.abs(g.standard_normal(d_sae)) * 0.3 + 0.05).astype(np.float32),
    }


def lens_load(root: Path, folder: str, monkeypatch: pytest.MonkeyPatch) -> LensSAE:
    """SAELens' Gemma 3 loader on a local copy of a repo, built into its SAE as `from_pretrained` does."""

    def download(repo_id: str, filename: str, subfolder: str | None = None, **_: object) -> str:
        path = root / (f"{subfolder}/{filename}" if subfolder else filename)
        if not path.exists():  # as the hub answers for a file the repo lacks
            raise loaders.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        return {n: list(t.shape) for n, t in load_file(root / filename).items()}

    monkeypatch.setattr(loaders, "hf_hub_download", download)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)
    cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(REPO, folder)
    cfg = loaders.handle_config_defaulting(cfg)
    sae_cfg = LensSAE.get_sae_config_class_for_architecture(cfg["architecture"]).from_dict(cfg)
    sae = LensSAE.get_sae_class_for_architecture(sae_cfg.architecture())(sae_cfg)
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state)
    return sae


def x_batch(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(7)) * 2


def test_hub_layout_loads_with_numpy_and_saelens_encodings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = gs2_arrays(d_sae=16384)
    folder = tmp_path / SAE_ID
    folder.mkdir(parents=True)
    save_file(arrays, folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "jump_relu",
        "model_name": "gemma-v3-270m-pt", "hf_hook_point_in": "model.layers.6.output"}))  # fmt: skip
    sae = io.load(tmp_path, SAE_ID)
    x = x_batch()
    pre = x.numpy() @ arrays["w_enc"] + arrays["b_enc"]
    want = pre * (pre > arrays["threshold"])
    np.testing.assert_allclose(sae.encode(x).detach().numpy(), want, **TOL)
    lens = lens_load(tmp_path, SAE_ID, monkeypatch)
    torch.testing.assert_close(sae.encode(x).detach(), lens.encode(x).detach(), **TOL)
    c = sae.cfg
    assert (c.architecture, c.layer, c.site, c.hook_name) == (
        "jumprelu", 6, "resid_post", "blocks.6.hook_resid_post",
    )  # fmt: skip
    assert c.extra["width"] == "16k" and c.extra["l0"] == "small" and c.model == "gemma-v3-270m-pt"


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "batchtopk"])
def test_saved_folder_loads_in_saelens_with_same_encodings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    g = torch.Generator().manual_seed(1)
    cfg = SAEConfig(architecture=arch, d_in=D, d_sae=M, k=4 if arch == "batchtopk" else None,
                    apply_b_dec_to_input=True, input_scale=3.0, model="google/gemma-3-270m",
                    layer=6, site="mlp_out")  # fmt: skip
    sae = SAE.from_arrays(cfg, {
        "W_enc": torch.randn(D, M, generator=g) * 0.4, "W_dec": torch.randn(M, D, generator=g) * 0.4,
        "b_enc": torch.randn(M, generator=g) * 0.1, "b_dec": torch.randn(D, generator=g),
        "threshold": torch.rand(M, generator=g) * 0.5,
    }).eval()  # fmt: skip
    folder = "mlp_out_all/layer_6_width_64_l0_medium"
    io.save(sae, tmp_path / folder, format="gemmascope2")
    raw = json.loads((tmp_path / folder / "config.json").read_text())
    assert raw["hf_hook_point_in"] == "model.layers.6.post_feedforward_layernorm.output"
    assert sorted(load_file(tmp_path / folder / "params.safetensors")) == sorted(
        ["w_enc", "w_dec", "b_enc", "b_dec", "threshold"]
    )
    lens = lens_load(tmp_path, folder, monkeypatch)
    assert lens.cfg.metadata.hook_name == "blocks.6.hook_mlp_out"
    x = x_batch()
    want = sae.encode(x).detach()
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(lens.encode(x).detach(), want, **TOL)
    torch.testing.assert_close(lens(x).detach(), sae(x).detach(), **TOL)
    back = io.load(tmp_path / folder)
    assert (back.cfg.layer, back.cfg.site, back.cfg.model) == (6, "mlp_out", "google/gemma-3-270m")
    torch.testing.assert_close(back.encode(x), want, **TOL)


def test_topk_is_refused(tmp_path: Path) -> None:
    cfg = SAEConfig(architecture="topk", d_in=D, d_sae=M, k=4)
    with pytest.raises(ValueError, match=r"a topk SAE cannot be saved as Gemma Scope 2"):
        io.save(SAE(cfg), tmp_path / "t", format="gemmascope2")


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_transcoders_load_and_save_both_ways_with_saelens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, affine: bool
) -> None:
    g = np.random.default_rng(4)
    skip = {"affine_skip_connection": (g.standard_normal((D, D)) * 0.2).astype(np.float32)}
    sae_id = f"transcoder_all/layer_3_width_16k_l0_big{'_affine' if affine else ''}"
    folder = tmp_path / sae_id
    folder.mkdir(parents=True)  # the hub layout: weights alone, the config inferred from names
    save_file(
        {**gs2_arrays(d_sae=16384), **(skip if affine else {})}, folder / "params.safetensors"
    )
    sae = io.load(tmp_path, sae_id)
    c = sae.cfg
    assert (c.layer, c.site, c.target_site, c.skip_connection) == (3, "mlp_in", "mlp_out", affine)
    assert c.extra["l0"] == "big"
    lens = lens_load(tmp_path, sae_id, monkeypatch)
    assert lens.cfg.architecture() == (
        "jumprelu_skip_transcoder" if affine else "jumprelu_transcoder"
    )
    x = x_batch()
    torch.testing.assert_close(sae.encode(x).detach(), lens.encode(x).detach(), **TOL)
    torch.testing.assert_close(sae(x).detach(), lens(x).detach(), **TOL)
    if affine:
        torch.testing.assert_close(
            sae.skip(x), x @ torch.from_numpy(skip["affine_skip_connection"])
        )
    out = f"transcoder_all/layer_3_width_16k_l0_big{'_affine' if affine else ''}"
    sae.cfg.model = "google/gemma-3-270m"  # SAELens needs the config's model_name
    io.save(sae, tmp_path / "ours" / out, format="gemmascope2")
    raw = json.loads((tmp_path / "ours" / out / "config.json").read_text())
    assert raw["hf_hook_point_in"] == "model.layers.3.pre_feedforward_layernorm.output"
    assert raw["hf_hook_point_out"] == "model.layers.3.post_feedforward_layernorm.output"
    assert raw["affine_connection"] is affine
    again = lens_load(tmp_path / "ours", out, monkeypatch)
    torch.testing.assert_close(again(x).detach(), lens(x).detach(), **TOL)
    back = io.load(tmp_path / "ours" / out)
    assert (back.cfg.site, back.cfg.target_site, back.cfg.skip_connection) == (
        "mlp_in", "mlp_out", affine,
    )  # fmt: skip
    torch.testing.assert_close(back(x), sae(x).detach(), **TOL)


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_clts_load_in_saelens_layer_by_layer_and_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, affine: bool
) -> None:
    """Gemma Scope 2's `clt/` folders: SAELens reads one layer's file as a transcoder whose encoder
    is that layer's and whose decoder is its rows summed over the layers they write."""
    L, g = 3, torch.Generator().manual_seed(2)
    cfg = SAEConfig("jumprelu", d_in=D, d_sae=M, layer=0, site="mlp_in", target_site="mlp_out",
                    skip_connection=affine, n_layers=L, model="google/gemma-3-270m")  # fmt: skip
    clt = CLT.from_arrays(cfg, {
        "W_enc": torch.randn(L, D, M, generator=g) * 0.3, "b_enc": torch.randn(L, M, generator=g) * 0.1,
        "threshold": torch.rand(L, M, generator=g) * 0.3, "b_dec": torch.randn(L, D, generator=g),
        **{f"W_dec_{i}": torch.randn(M, L - i, D, generator=g) for i in range(L)},
        **({"W_skip": torch.randn(L, D, D, generator=g)} if affine else {}),
    })  # fmt: skip
    name = f"clt/width_16k_l0_small{'_affine' if affine else ''}"
    folder = io.save(clt, tmp_path / name, format="gemmascope2")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors",
    ]  # fmt: skip
    x = torch.randn(40, L, D, generator=g)
    with torch.no_grad():
        z = clt.encode(x)
    for i in range(L):
        lens = lens_load(tmp_path, f"{name}/layer_{i}", monkeypatch)
        torch.testing.assert_close(lens.encode(x[:, i]).detach(), z[:, i], **TOL)
        torch.testing.assert_close(lens.W_dec.detach(), clt.W_dec[i].detach().sum(1), **TOL)
    (folder / "config.json").unlink()  # as on the hub: the weights alone
    back = io.load(folder)
    assert isinstance(back, CLT) and back.cfg.skip_connection == affine and back.n_layers == L
    torch.testing.assert_close(back(x), clt(x).detach(), **TOL)
