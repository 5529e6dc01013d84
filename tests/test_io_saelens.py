"""SAELens 6 interop, checked against SAELens itself: folders its `save_model` writes load here with
the same encodings, and folders we write load in SAELens with the same encodings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sae_lens
import torch
from sae_lens.saes.sae import SAEMetadata

from gemmascope import io
from gemmascope.sae import SAE, SAEConfig

D, M, K = 12, 48, 5
TOL = {"rtol": 1e-5, "atol": 1e-5}


def x_batch(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(7)) * 2


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere; thresholds straddle 0 so the JumpReLU clamp is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name != "b_dec" else 1.0))


def lens_sae(arch: str, apply_b_dec: bool, *, rescale: bool = False, **cfg) -> sae_lens.SAE:
    meta = SAEMetadata(
        model_name="gpt2",
        hook_name="blocks.3.hook_resid_post",
        context_size=128,
        dataset_path="monology/pile-uncopyrighted",
        prepend_bos=True,
    )
    common = {"d_in": D, "d_sae": M, "apply_b_dec_to_input": apply_b_dec, "metadata": meta, **cfg}
    if arch == "topk":
        sae = sae_lens.TopKSAE(
            sae_lens.TopKSAEConfig(k=K, rescale_acts_by_decoder_norm=rescale, **common)
        )
    elif arch == "jumprelu":
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**common))
    else:
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**common))
    randomize(sae, seed=11)
    return sae


def ours(arch: str, *, seed: int = 0, **cfg) -> SAE:
    g = torch.Generator().manual_seed(seed)
    c = SAEConfig(architecture=arch, d_in=D, d_sae=M, k=K if "topk" in arch else None, **cfg)
    arrays = {
        "W_enc": torch.randn(D, M, generator=g) * 0.4,
        "W_dec": torch.randn(M, D, generator=g) * 0.4,
        "b_enc": torch.randn(M, generator=g) * 0.1,
        "b_dec": torch.randn(D, generator=g),
        "threshold": torch.rand(M, generator=g) * 0.5,
    }
    return SAE.from_arrays(c, arrays).eval()


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize(
    "arch, rescale, expected",
    [
        ("standard", False, "relu"),
        ("jumprelu", False, "jumprelu"),
        ("topk", False, "topk"),
        ("topk", True, "topk"),
    ],
)
def test_saelens_save_model_loads_with_same_encodings(
    tmp_path: Path, arch: str, rescale: bool, expected: str, apply_b_dec: bool
) -> None:
    lens = lens_sae(arch, apply_b_dec, rescale=rescale)
    lens.save_model(tmp_path / "lens")
    sae = io.load(tmp_path / "lens")
    x = x_batch()
    want = lens.encode(x).detach()
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(sae.encode(x).detach(), want, **TOL)
    c = sae.cfg
    assert (c.architecture, c.apply_b_dec_to_input, c.k) == (
        expected,
        apply_b_dec,
        K if arch == "topk" else None,
    )
    assert (c.model, c.layer, c.site, c.hook_name) == (
        "gpt2",
        3,
        "resid_post",
        "blocks.3.hook_resid_post",
    )
    assert (c.dataset, c.context_size, c.extra["saelens"]["prepend_bos"]) == (
        "monology/pile-uncopyrighted",
        128,
        True,
    )


@pytest.mark.parametrize("apply_b_dec, scale", [(True, 4.0), (False, 1.0)])
@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk", "batchtopk"])
def test_saved_saelens_folder_loads_in_saelens_with_same_encodings(
    tmp_path: Path, arch: str, apply_b_dec: bool, scale: float
) -> None:
    sae = ours(
        arch,
        apply_b_dec_to_input=apply_b_dec,
        input_scale=scale,
        model="gpt2",
        layer=2,
        site="mlp_out",
    )
    io.save(sae, tmp_path / "out", format="saelens")
    lens = sae_lens.SAE.load_from_disk(tmp_path / "out")
    assert type(lens).__name__ == {"relu": "StandardSAE", "topk": "TopKSAE"}.get(
        arch, "JumpReLUSAE"
    )
    assert lens.cfg.metadata.hook_name == "blocks.2.hook_mlp_out"
    x = x_batch()
    want = sae.encode(x).detach()
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(lens.encode(x).detach(), want, **TOL)
    torch.testing.assert_close(lens(x).detach(), sae(x).detach(), **TOL)
    back = io.load(tmp_path / "out")  # and back here: architecture, k and our fields survive
    assert (back.cfg.architecture, back.cfg.k, back.cfg.layer, back.cfg.site) == (
        arch,
        sae.cfg.k,
        2,
        "mlp_out",
    )


def test_saelens_round_trip_keeps_its_metadata(tmp_path: Path) -> None:
    lens_sae("jumprelu", True).save_model(tmp_path / "a")
    io.save(io.load(tmp_path / "a"), tmp_path / "b", format="saelens")
    meta = json.loads((tmp_path / "b" / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["prepend_bos"], meta["context_size"]) == ("gpt2", True, 128)


@pytest.mark.parametrize("rescale", [True, False])
def test_batchtopk_inference_form_and_training_checkpoint(tmp_path: Path, rescale: bool) -> None:
    cfg = sae_lens.BatchTopKTrainingSAEConfig(
        k=K, d_in=D, d_sae=M, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=True
    )
    train = sae_lens.BatchTopKTrainingSAE(cfg)
    randomize(train, seed=3)
    train.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    train.save_inference_model(tmp_path / "inference")  # SAELens' inference form: a JumpReLU
    train.save_model(tmp_path / "checkpoint")  # training form: batchtopk + scalar topk_threshold
    lens = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    x = x_batch()
    for folder in ("inference", "checkpoint"):
        sae = io.load(tmp_path / folder)
        assert (sae.cfg.architecture, sae.cfg.k) == ("batchtopk", K), folder
        torch.testing.assert_close(sae.encode(x).detach(), lens.encode(x).detach(), **TOL)
        # In training mode both pick the k * n_tokens largest activations of the batch.
        torch.testing.assert_close(sae.train().encode(x).detach(), train.encode(x).detach(), **TOL)


def test_expected_average_norm_becomes_input_scale(tmp_path: Path) -> None:
    lens = lens_sae("jumprelu", True, normalize_activations="expected_average_only_in")
    lens.save_model(tmp_path / "ckpt")
    with pytest.raises(
        ValueError,
        match=r"cfg.json: normalize_activations='expected_average_only_in' but the folder has no activation_scaler.json",
    ):
        io.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "activation_scaler.json").write_text('{"scaling_factor": 0.5}')
    sae = io.load(tmp_path / "ckpt")
    assert sae.cfg.input_scale == 2.0
    lens.fold_activation_norm_scaling_factor(0.5)  # what the factor means, per SAELens
    x = x_batch()
    torch.testing.assert_close(sae.encode(x).detach(), lens.encode(x).detach(), **TOL)
    torch.testing.assert_close(sae(x).detach(), lens(x).detach(), **TOL)


def test_per_token_normalisation_is_refused(tmp_path: Path) -> None:
    lens_sae("standard", True, normalize_activations="layer_norm").save_model(tmp_path / "ln")
    with pytest.raises(
        ValueError, match=r"ln/cfg.json: normalize_activations='layer_norm' cannot be represented"
    ):
        io.load(tmp_path / "ln")


def test_hook_z_sae_reads_head_outputs_in_saelens(tmp_path: Path) -> None:
    sae = ours("jumprelu", layer=5, site="attn_z")  # D = 3 heads * 4 dims
    io.save(sae, tmp_path / "z", format="saelens")
    lens = sae_lens.SAE.load_from_disk(tmp_path / "z")
    assert (
        lens.cfg.reshape_activations == "hook_z"
        and lens.cfg.metadata.hook_name == "blocks.5.attn.hook_z"
    )
    x = x_batch()
    torch.testing.assert_close(
        lens.encode(x.reshape(-1, 3, 4)).detach(), sae.encode(x).detach(), **TOL
    )


def test_negative_thresholds_are_refused_for_saelens(tmp_path: Path) -> None:
    sae = ours("jumprelu")
    with torch.no_grad():
        sae.threshold[0] = -0.1
    with pytest.raises(ValueError, match=r"out: this SAE has negative thresholds.*clamp"):
        io.save(sae, tmp_path / "out", format="saelens")
    assert not (tmp_path / "out").exists()


def test_pre_6_and_unsupported_architectures_are_refused(tmp_path: Path) -> None:
    lens_sae("standard", True).save_model(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "cfg.json").read_text())
    cfg["metadata"]["sae_lens_version"] = "5.9.1"
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"old/cfg.json: written by SAELens 5.9.1; expected a SAELens 6.x"
    ):
        io.load(tmp_path / "old")
    gated = sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D, d_sae=M))
    gated.save_model(tmp_path / "gated")
    with pytest.raises(ValueError, match=r"gated/cfg.json: architecture 'gated' is not supported"):
        io.load(tmp_path / "gated")
