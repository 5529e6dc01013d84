"""The cross-layer transcoder module: its output is every earlier layer's latents decoded into
each layer, it saves losslessly, and bad shapes are refused with the shape it wanted."""

import pytest
import torch

from gemmascope import io
from gemmascope.clt import CLT
from gemmascope.sae import SAE, SAEConfig

L, D, M = 3, 8, 16


def random_clt(arch: str = "jumprelu", skip: bool = True, seed: int = 0) -> CLT:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(arch, d_in=D, d_sae=M, k=3 if "topk" in arch else None, layer=0,  # type: ignore[arg-type]
                    site="mlp_in", target_site="mlp_out", skip_connection=skip, n_layers=L)  # fmt: skip
    arrays = {"W_enc": torch.randn(L, D, M, generator=g), "b_enc": torch.randn(L, M, generator=g),
              "threshold": torch.rand(L, M, generator=g), "b_dec": torch.randn(L, D, generator=g),
              **{f"W_dec_{i}": torch.randn(M, L - i, D, generator=g) for i in range(L)},
              **({"W_skip": torch.randn(L, D, D, generator=g)} if skip else {})}  # fmt: skip
    return CLT.from_arrays(cfg, arrays).eval()


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "topk"])
def test_each_layer_is_every_earlier_layers_latents_decoded(arch: str) -> None:
    clt = random_clt(arch)
    x = torch.randn(5, L, D)  # (batch, layer, d)
    with torch.no_grad():
        z = clt.encode(x)  # (5, L, M)
        want = torch.stack([
            sum(z[:, i] @ clt.W_dec[i][:, j - i] for i in range(j + 1)) + clt.b_dec[j]
            + x[:, j] @ clt.W_skip[j]
            for j in range(L)
        ], 1)  # fmt: skip
        torch.testing.assert_close(clt(x), want)
        for i in range(L):  # one layer's encoder alone, as attribution uses it
            torch.testing.assert_close(clt.layer_transcoder(i).encode(x[:, i]), z[:, i])
    assert (z == 0).any() and (z != 0).any()


def test_saves_and_loads_losslessly(tmp_path) -> None:
    clt = random_clt()
    folder = io.save(clt, tmp_path / "clt")
    again = io.load(folder)
    assert isinstance(again, CLT) and again.cfg == clt.cfg
    for name, value in clt.state_arrays().items():
        torch.testing.assert_close(again.state_arrays()[name], value)


def test_bad_inputs_say_what_was_expected() -> None:
    clt = random_clt()
    with pytest.raises(ValueError, match=r"reads \[..., n_layers=3, d_in=8\]"):
        clt(torch.randn(5, D))
    arrays = {k: v for k, v in clt.state_arrays().items() if k != "W_dec_2"}
    with pytest.raises(ValueError, match="missing array 'W_dec_2'"):
        CLT.from_arrays(clt.cfg, arrays)
    with pytest.raises(
        ValueError, match=r"'W_dec_1' has shape \(16, 3, 8\), expected \(16, 2, 8\)"
    ):
        CLT.from_arrays(clt.cfg, {**clt.state_arrays(), "W_dec_1": torch.zeros(M, 3, D)})
    with pytest.raises(ValueError, match="NaN or inf"):
        CLT.from_arrays(clt.cfg, {**clt.state_arrays(), "b_dec": torch.full((L, D), float("nan"))})
    with pytest.raises(ValueError, match="build it with `gemmascope.clt.CLT`"):
        SAE(clt.cfg)
    with pytest.raises(ValueError, match="needs `layer` .* and `target_site`"):
        SAEConfig("jumprelu", d_in=D, d_sae=M, layer=0, site="mlp_in", n_layers=L)
