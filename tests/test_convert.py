"""`gemmascope.io.convert` and `gemmascope convert`: chains through every format keep the encodings,
the source format is detected, and what cannot be converted exactly is refused, saying why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gemmascope import io
from gemmascope.cli import app
from gemmascope.io import FORMATS
from gemmascope.sae import SAE, SAEConfig

D, M, K = 12, 48, 5
TOL = {"rtol": 1e-5, "atol": 1e-5}


def sae_of(arch: str, **cfg) -> SAE:
    g = torch.Generator().manual_seed(0)
    c = SAEConfig(architecture=arch, d_in=D, d_sae=M, k=K if "topk" in arch else None, **cfg)
    w_dec = torch.randn(M, D, generator=g)
    arrays = {
        "W_enc": torch.randn(D, M, generator=g) * 0.4,
        "W_dec": w_dec / w_dec.norm(dim=-1, keepdim=True),
        "b_enc": torch.randn(M, generator=g) * 0.1,
        "b_dec": torch.randn(D, generator=g),
        "threshold": torch.rand(M, generator=g) * 0.5
        if arch != "batchtopk"
        else torch.full((M,), 0.3),
    }
    return SAE.from_arrays(c, arrays).eval()


def x_batch(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(7)) * 2


CHAINS = {
    "jumprelu": ["saelens", "gemmascope2", "dictionary_learning", "gemmascope", "saelens", "npz"],
    "topk": ["sparsify", "saelens", "dictionary_learning", "gemmascope", "sparsify"],
    "batchtopk": ["dictionary_learning", "saelens", "gemmascope", "dictionary_learning"],
    "relu": ["dictionary_learning", "saelens", "gemmascope2", "gemmascope"],
}


@pytest.mark.parametrize("arch", sorted(CHAINS))
def test_chain_through_formats_keeps_encodings(tmp_path: Path, arch: str) -> None:
    sae = sae_of(arch, apply_b_dec_to_input=True, layer=4, site="resid_post")
    x = x_batch()
    want = sae.encode(x).detach()
    assert (want > 0).any() and (want == 0).any()
    src = io.save(sae, tmp_path / "start")
    for i, fmt in enumerate(CHAINS[arch]):
        src = io.convert(src, tmp_path / f"{i}_{fmt}", to=fmt)
        back = io.load(src)
        torch.testing.assert_close(back.encode(x).detach(), want, **TOL, msg=f"after {fmt}")
        if fmt != "npz":  # params.npz holds weights only; layer and site come from its path
            assert (back.cfg.layer, back.cfg.site) == (4, "resid_post"), fmt
    if arch in ("topk", "batchtopk"):
        assert (back.cfg.architecture, back.cfg.k) == (arch, K)  # k survives every hop


def test_cli_convert_detects_the_source_format(tmp_path: Path) -> None:
    io.save(sae_of("topk"), tmp_path / "lens", format="saelens")
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "lens"), str(tmp_path / "layers.4"),
                                 "--to", "sparsify"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "layers.4 (sparsify)" in r.output
    x = x_batch()
    torch.testing.assert_close(
        io.load(tmp_path / "layers.4").encode(x), sae_of("topk").encode(x), **TOL
    )


def test_cli_error_lists_the_formats_tried(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0")
    r = CliRunner().invoke(
        app, ["convert", str(tmp_path / "junk"), str(tmp_path / "out"), "--to", "npz"]
    )
    assert r.exit_code == 2
    text = " ".join(r.output.split())  # rich may wrap long lines
    assert "junk: no SAE found. Tried" in text and "weights.bin" in text
    for description in FORMATS.values():
        assert " ".join(description.split()) in text, description
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_conversion_that_loses_meaning(tmp_path: Path) -> None:
    io.save(sae_of("topk"), tmp_path / "topk")
    for to, why in [("npz", "topk SAE cannot be saved as Gemma Scope params.npz"),
                    ("gemmascope2", "topk SAE cannot be saved as Gemma Scope 2")]:  # fmt: skip
        r = CliRunner().invoke(
            app, ["convert", str(tmp_path / "topk"), str(tmp_path / to), "--to", to]
        )
        assert r.exit_code == 2 and why in " ".join(r.output.split()), r.output
        assert not (tmp_path / to).exists()
    r = CliRunner().invoke(
        app, ["convert", str(tmp_path / "topk"), str(tmp_path / "x"), "--to", "pt"]
    )
    assert r.exit_code == 2 and "unknown format 'pt'" in r.output


def test_convert_with_sae_id_from_a_folder_of_several(tmp_path: Path) -> None:
    for layer in (2, 10):
        io.save(sae_of("jumprelu", layer=layer, site="resid_post"), tmp_path / "run" / f"L{layer}",
                format="saelens")  # fmt: skip
    out = io.convert(tmp_path / "run", tmp_path / "gs2", to="gemmascope2", sae_id="L10")
    assert io.load(out).cfg.layer == 10
