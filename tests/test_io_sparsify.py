"""EleutherAI sparsify interop, checked against sparsify itself: folders its `save_to_disk` writes
load here with the same encodings, and folders we write load in sparsify with the same encodings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sparsify import SparseCoder, SparseCoderConfig

from gemmascope import io
from gemmascope.sae import SAE, SAEConfig

D, M, K = 12, 48, 5
TOL = {"rtol": 1e-5, "atol": 1e-5}


def x_batch(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(7)) * 2


def coder(seed: int = 11, **cfg) -> SparseCoder:
    sae = SparseCoder(D, SparseCoderConfig(k=K, num_latents=M, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


def dense(sae: SparseCoder, x: torch.Tensor) -> torch.Tensor:
    """sparsify's encoding (top-k values and indices) as a dense [n, M] tensor."""
    acts, idx, _ = sae.encode(x)
    return torch.zeros(len(x), sae.num_latents).scatter_(-1, idx, acts).detach()


def ours(arch: str = "topk", **cfg) -> SAE:
    g = torch.Generator().manual_seed(0)
    c = SAEConfig(architecture=arch, d_in=D, d_sae=M, k=K if "topk" in arch else None, **cfg)
    arrays = {
        "W_enc": torch.randn(D, M, generator=g) * 0.4,
        "W_dec": torch.randn(M, D, generator=g) * 0.4,
        "b_enc": torch.randn(M, generator=g) * 0.1,
        "b_dec": torch.randn(D, generator=g),
        "threshold": torch.rand(M, generator=g) * 0.5,
    }
    return SAE.from_arrays(c, arrays).eval()


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_save_to_disk_loads_with_same_encodings(tmp_path: Path, transcode: bool) -> None:
    theirs = coder(transcode=transcode)
    theirs.save_to_disk(tmp_path / "layers.3")
    sae = io.load(tmp_path / "layers.3")
    x = x_batch()
    want = dense(theirs, x)
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(sae.encode(x).detach(), want, **TOL)
    c = sae.cfg
    assert (c.architecture, c.k, c.apply_b_dec_to_input) == ("topk", K, not transcode)
    # a transcoder reads the block's input and predicts its output
    where = (3, "resid_pre", "resid_post") if transcode else (3, "resid_post", None)
    assert (c.layer, c.site, c.target_site, c.hook_name) == (*where, "layers.3")
    torch.testing.assert_close(sae(x).detach(), theirs(x).sae_out.detach(), **TOL)


def test_skip_transcoders_load_and_save_both_ways(tmp_path: Path) -> None:
    theirs = coder(transcode=True, skip_connection=True)
    theirs.save_to_disk(tmp_path / "layers.4.mlp")
    sae = io.load(tmp_path / "layers.4.mlp")
    c = sae.cfg
    assert (c.layer, c.site, c.target_site, c.skip_connection) == (4, "mlp_in", "mlp_out", True)
    x = x_batch()
    torch.testing.assert_close(sae.encode(x).detach(), dense(theirs, x), **TOL)
    torch.testing.assert_close(sae(x).detach(), theirs(x).sae_out.detach(), **TOL)
    assert (sae.skip(x) - 0).abs().max() > 0.1  # the skip carries part of the output
    io.save(sae, tmp_path / "out" / "layers.4.mlp", format="sparsify")
    again = SparseCoder.load_from_disk(tmp_path / "out" / "layers.4.mlp")
    assert again.cfg.transcode and again.cfg.skip_connection
    torch.testing.assert_close(again(x).sae_out.detach(), theirs(x).sae_out.detach(), **TOL)


@pytest.mark.parametrize("apply_b_dec, scale", [(True, 4.0), (False, 1.0)])
def test_saved_sparsify_folder_loads_in_sparsify_with_same_encodings(
    tmp_path: Path, apply_b_dec: bool, scale: float
) -> None:
    sae = ours(apply_b_dec_to_input=apply_b_dec, input_scale=scale, model="gpt2", layer=2,
               site="resid_post", extra={"lr": 1e-3})  # fmt: skip
    io.save(sae, tmp_path / "h.2", format="sparsify")
    theirs = SparseCoder.load_from_disk(tmp_path / "h.2")
    x = x_batch()
    want = sae.encode(x).detach()
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(dense(theirs, x), want, **TOL)
    torch.testing.assert_close(theirs(x).sae_out.detach(), sae(x).detach(), **TOL)
    back = io.load(tmp_path / "h.2")  # and back here: our fields survive in cfg.json
    c = back.cfg
    assert (c.architecture, c.k, c.model, c.layer, c.site, c.extra["lr"]) == (
        "topk", K, "gpt2", 2, "resid_post", 1e-3,
    )  # fmt: skip
    torch.testing.assert_close(back.encode(x), want, **TOL)


def test_hookpoint_folders_are_listed_and_picked(tmp_path: Path) -> None:
    for layer in (10, 2):
        coder(seed=layer).save_to_disk(tmp_path / "run" / f"layers.{layer}")
    assert io.list_sae_ids(tmp_path / "run") == ["layers.2", "layers.10"]
    sae = io.load(tmp_path / "run", "layers.10")
    torch.testing.assert_close(sae.encode(x_batch()), dense(coder(seed=10), x_batch()), **TOL)


def test_unplaced_skip_transcoder_and_groupmax_are_refused(tmp_path: Path) -> None:
    coder(transcode=True, skip_connection=True).save_to_disk(tmp_path / "skip")
    with pytest.raises(ValueError, match=r"skip: a skip transcoder at hookpoint 'skip'"):
        io.load(tmp_path / "skip")
    coder().save_to_disk(tmp_path / "gm")
    cfg = json.loads((tmp_path / "gm" / "cfg.json").read_text())
    (tmp_path / "gm" / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(ValueError, match=r"gm/cfg.json: activation 'groupmax' is not supported"):
        io.load(tmp_path / "gm")


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "batchtopk"])
def test_non_topk_is_refused_for_sparsify(tmp_path: Path, arch: str) -> None:
    with pytest.raises(ValueError, match=rf"a {arch} SAE cannot be saved for sparsify.*TopK only"):
        io.save(ours(arch), tmp_path / "layers.0", format="sparsify")
    assert not (tmp_path / "layers.0").exists()
