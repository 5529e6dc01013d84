"""circuit-tracer transcoder sets, both ways, checked against circuit-tracer 0.5.0 itself in a venv of
its own (it pins transformers <= 4.57.3, so it is no test dependency; see `toolenv`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from toolenv import circuit_tracer_python

from gemmascope import io
from gemmascope.clt import CLT
from gemmascope.sae import SAE, SAEConfig

D, M, LAYERS = 12, 40, 3
TOL = {"rtol": 1e-5, "atol": 1e-5}

# In the venv: load a set as circuit-tracer loads its cached sets (config.yaml + layer files), then
# each layer's encode and forward (skip included) of x.
LOAD = """
import sys, glob, os, torch, yaml
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
folder, x, out = sys.argv[1:]
cfg = yaml.safe_load(open(os.path.join(folder, "config.yaml")))
paths = {int(p.rsplit("_", 1)[1].split(".")[0]): p for p in glob.glob(f"{folder}/layer_*.safetensors")}
tcs = load_transcoder_set(paths, scan=cfg["scan"], feature_input_hook=cfg["feature_input_hook"],
    feature_output_hook=cfg["feature_output_hook"], device=torch.device("cpu"), dtype=torch.float32,
    lazy_encoder=False, lazy_decoder=False)
x = torch.load(x, weights_only=True)
with torch.no_grad():
    torch.save({"hooks": [tcs.feature_input_hook, tcs.feature_output_hook],
                "encode": [tc.encode(x) for tc in tcs], "forward": [tc(x) for tc in tcs]}, out)
"""
# In the venv: a random JumpReLU skip set of circuit-tracer's own, saved as its cache saves one.
WRITE = """
import sys, os, torch, yaml
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
folder, x, out = sys.argv[1:]
d, m, n = DIMS
g = torch.Generator().manual_seed(5)
tcs = {}
for layer in range(n):
    tc = SingleLayerTranscoder(d, m, JumpReLU(torch.rand(m, generator=g) * 0.4), layer,
                               skip_connection=True, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        for p in (tc.W_enc, tc.W_dec, tc.b_enc, tc.b_dec, tc.W_skip):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    tcs[layer] = tc
tset = TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                     scan="test/scan")
os.makedirs(folder)
tset.to_safetensors(folder)
yaml.dump({"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
           "feature_output_hook": "hook_mlp_out", "scan": "test/scan"}, open(f"{folder}/config.yaml", "w"))
x = torch.load(x, weights_only=True)
with torch.no_grad():
    torch.save({"encode": [tc.encode(x) for tc in tset], "forward": [tc(x) for tc in tset]}, out)
""".replace("DIMS", f"{D}, {M}, {LAYERS}")


@pytest.fixture(scope="session")
def ct_python() -> Path:
    return circuit_tracer_python()


def transcoder(layer: int, arch: str = "jumprelu", skip: bool = True, **cfg: object) -> SAE:
    g = torch.Generator().manual_seed(layer)
    c = SAEConfig(arch, d_in=D, d_sae=M, k=4 if arch == "batchtopk" else None, layer=layer,  # type: ignore[arg-type]
                  site="mlp_in", target_site="mlp_out", skip_connection=skip, **cfg)  # fmt: skip
    arrays = {"W_enc": torch.randn(D, M, generator=g) * 0.4, "W_dec": torch.randn(M, D, generator=g),
              "b_enc": torch.randn(M, generator=g) * 0.1, "b_dec": torch.randn(D, generator=g),
              "threshold": torch.rand(M, generator=g) * 0.5,
              **({"W_skip": torch.randn(D, D, generator=g) * 0.3} if skip else {})}  # fmt: skip
    return SAE.from_arrays(c, arrays).eval()


def x_batch() -> torch.Tensor:
    return torch.randn(32, D, generator=torch.Generator().manual_seed(9)) * 2


@pytest.mark.slow
@pytest.mark.parametrize("arch,skip", [("jumprelu", True), ("relu", False), ("batchtopk", True)])
def test_saved_set_loads_in_circuit_tracer_with_same_outputs(
    tmp_path: Path, ct_python: Path, arch: str, skip: bool
) -> None:
    saes = [transcoder(layer, arch, skip, input_scale=2.0, apply_b_dec_to_input=True,
                       model="google/gemma-3-270m") for layer in (2, 0, 1)]  # fmt: skip
    folder = io.save_transcoders(saes, tmp_path / "set")
    x = x_batch()
    torch.save(x, tmp_path / "x.pt")
    subprocess.run(
        [ct_python, "-c", LOAD, folder, tmp_path / "x.pt", tmp_path / "out.pt"], check=True
    )
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    assert theirs["hooks"] == ["mlp.hook_in", "hook_mlp_out"]
    for layer, sae in enumerate(sorted(saes, key=lambda s: s.cfg.layer)):
        want = sae.encode(x).detach()
        assert (want > 0).any() and (want == 0).any()
        torch.testing.assert_close(theirs["encode"][layer], want, **TOL)
        torch.testing.assert_close(theirs["forward"][layer], sae(x).detach(), **TOL)
    back = io.load_transcoders(folder)  # and back: our fields ride along in config.yaml
    assert [(s.cfg.layer, s.cfg.model, s.cfg.skip_connection) for s in back] == [
        (layer, "google/gemma-3-270m", skip) for layer in range(LAYERS)
    ]
    torch.testing.assert_close(back[1](x), saes[2](x), **TOL)


@pytest.mark.slow
def test_circuit_tracers_own_set_loads_with_same_outputs(tmp_path: Path, ct_python: Path) -> None:
    x = x_batch()
    torch.save(x, tmp_path / "x.pt")
    folder = tmp_path / "theirs"
    subprocess.run(
        [ct_python, "-c", WRITE, folder, tmp_path / "x.pt", tmp_path / "out.pt"], check=True
    )
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    saes = io.load_transcoders(folder)
    assert [(s.cfg.layer, s.cfg.site, s.cfg.target_site, s.cfg.architecture, s.cfg.skip_connection)
            for s in saes] == [(i, "mlp_in", "mlp_out", "jumprelu", True) for i in range(LAYERS)]  # fmt: skip
    for layer, sae in enumerate(saes):
        torch.testing.assert_close(sae.encode(x), theirs["encode"][layer], **TOL)
        torch.testing.assert_close(sae(x), theirs["forward"][layer], **TOL)
        assert sae.skip(x).abs().max() > 0.1


def test_sets_circuit_tracer_cannot_load_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"transcoders for layers \[0, 2\]; .* every layer from 0"):
        io.save_transcoders([transcoder(0), transcoder(2)], tmp_path / "gap")
    plain = SAE(SAEConfig("jumprelu", d_in=D, d_sae=M, layer=0, site="resid_post"))
    with pytest.raises(ValueError, match="is not an MLP transcoder"):
        io.save_transcoders([plain], tmp_path / "sae")
    with pytest.raises(ValueError, match="differ in width .* or skip connection"):
        io.save_transcoders([transcoder(0), transcoder(1, skip=False)], tmp_path / "mixed")
    with pytest.raises(ValueError, match="holds a set of transcoders"):
        io.save(transcoder(0), tmp_path / "one", format="circuit_tracer")
    assert not any(tmp_path.iterdir())


def test_a_run_folder_converts_to_a_set(tmp_path: Path) -> None:
    """`gemmascope convert RUN DEST --to circuit_tracer` gathers a run's transcoders, one per layer."""
    from typer.testing import CliRunner

    from gemmascope.cli import app

    for layer in range(LAYERS):
        io.save(transcoder(layer), tmp_path / "run" / f"layer_{layer}_mlp_in_to_mlp_out_skip")
        io.save(
            transcoder(layer, skip=False), tmp_path / "run" / f"layer_{layer}_mlp_in_to_mlp_out"
        )
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "run"), str(tmp_path / "set"),
                                      "--to", "circuit_tracer"])  # fmt: skip
    assert result.exit_code == 2 and "layer 0 has 2 transcoders" in result.output
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "run"), str(tmp_path / "set"),
                                      "--to", "circuit_tracer", "--sae-id", "_skip"])  # fmt: skip
    assert result.exit_code == 0, result.output
    raw = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert raw["model_kind"] == "transcoder_set" and raw["feature_output_hook"] == "hook_mlp_out"
    saes = io.load_transcoders(tmp_path / "set")
    x = x_batch()
    for layer, sae in enumerate(saes):
        torch.testing.assert_close(sae(x), transcoder(layer)(x), **TOL)


# In the venv: circuit-tracer's own CLT loader on our folder, then its encode and forward of xs
# `[n_layers, B, d]`; and its Gemma Scope 2 CLT loader on a `layer_{i}.safetensors` folder.
LOAD_CLT = """
import sys, glob, torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt, load_gemma_scope_2_clt
folder, kind, x, out = sys.argv[1:]
if kind == "circuit_tracer":
    clt = load_clt(folder, lazy_decoder=False, device=torch.device("cpu"), dtype=torch.float32)
else:  # its loader reads layers 0 .. max(key) - 1, so one key past the last
    n = len(glob.glob(f"{folder}/layer_*.safetensors"))
    paths = {i: f"{folder}/layer_{min(i, n - 1)}.safetensors" for i in range(n + 1)}
    clt = load_gemma_scope_2_clt(paths, device=torch.device("cpu"), dtype=torch.float32)
x = torch.load(x, weights_only=True)
with torch.no_grad():  # its forward drops the skip's input (0.5.0), decode takes it
    z = clt.encode(x)
    torch.save({"encode": z, "forward": clt.decode(z.to_sparse(), x), "n_layers": clt.n_layers}, out)
"""


def random_clt(arch: str = "jumprelu", skip: bool = False, **cfg: object) -> CLT:
    g = torch.Generator().manual_seed(3)
    c = SAEConfig(arch, d_in=D, d_sae=M, k=4 if "topk" in arch else None, layer=0,  # type: ignore[arg-type]
                  site="mlp_in", target_site="mlp_out", skip_connection=skip, n_layers=LAYERS, **cfg)  # fmt: skip
    arrays = {"W_enc": torch.randn(LAYERS, D, M, generator=g) * 0.4,
              "b_enc": torch.randn(LAYERS, M, generator=g) * 0.1,
              "threshold": torch.rand(LAYERS, M, generator=g) * 0.5,
              "b_dec": torch.randn(LAYERS, D, generator=g),
              **{f"W_dec_{i}": torch.randn(M, LAYERS - i, D, generator=g) for i in range(LAYERS)},
              **({"W_skip": torch.randn(LAYERS, D, D, generator=g) * 0.3} if skip else {})}  # fmt: skip
    return CLT.from_arrays(c, arrays).eval()


def layered_x() -> torch.Tensor:
    return torch.randn(32, LAYERS, D, generator=torch.Generator().manual_seed(9)) * 2  # (B, L, d)


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "batchtopk"])
def test_clts_round_trip_through_circuit_tracers_files(tmp_path: Path, arch: str) -> None:
    clt = random_clt(arch, model="google/gemma-3-270m")
    folder = io.save(clt, tmp_path / "clt", format="circuit_tracer")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors",
                     "W_enc_0.safetensors", "W_enc_1.safetensors", "W_enc_2.safetensors", "config.yaml"]  # fmt: skip
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    assert raw["model_kind"] == "cross_layer_transcoder"
    back = io.load_transcoders(folder)
    assert isinstance(back, CLT) and back.cfg.model == "google/gemma-3-270m"
    x = layered_x()
    torch.testing.assert_close(back(x), clt(x).detach(), **TOL)
    with pytest.raises(ValueError, match="without a skip connection"):
        io.save(random_clt(skip=True), tmp_path / "skip", format="circuit_tracer")
    with pytest.raises(ValueError, match="saves as"):
        io.save(clt, tmp_path / "npz", format="npz")


@pytest.mark.slow
@pytest.mark.parametrize("fmt,skip", [("circuit_tracer", False), ("gemmascope2", True)])
def test_saved_clt_loads_in_circuit_tracer_with_same_outputs(
    tmp_path: Path, ct_python: Path, fmt: str, skip: bool
) -> None:
    clt = random_clt(skip=skip)
    folder = io.save(clt, tmp_path / "clt", format=fmt)
    x = layered_x()
    torch.save(x.transpose(0, 1).contiguous(), tmp_path / "x.pt")  # theirs: (L, B, d)
    subprocess.run(
        [ct_python, "-c", LOAD_CLT, folder, fmt, tmp_path / "x.pt", tmp_path / "out.pt"], check=True
    )
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    assert theirs["n_layers"] == LAYERS
    with torch.no_grad():
        z, y = clt.encode(x), clt(x)
    assert (z > 0).any() and (z == 0).any()
    torch.testing.assert_close(theirs["encode"].transpose(0, 1), z, **TOL)
    torch.testing.assert_close(theirs["forward"].transpose(0, 1), y, **TOL)
