"""dictionary_learning interop, both ways.

Its PyPI release (0.1.0) pins nnsight<0.4, whose dependencies would replace our torch, so it is no
test dependency. Their side is checked two ways instead:
- fixtures under tests/fixtures/dictionary_learning were written by its own `trainSAE` (see
  make_fixtures.py there), with the encodings its `load_dictionary` gives;
- folders we write are loaded live by its `load_dictionary` in a separate venv (`dl_python`), built
  once into a cache dir with our torch first and then only the packages that
  `dictionary_learning.utils` imports, nnsight 0.3.7 among them, installed so that torch stays ours.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import UNPICKLED, Exploit
from safetensors.torch import load_file
from toolenv import TORCH, tool_python

from gemmascope import io
from gemmascope.sae import SAE, SAEConfig

FIXTURES = Path(__file__).parent / "fixtures" / "dictionary_learning"
D, M, K = 12, 48, 5
TOL = {"rtol": 1e-5, "atol": 1e-5}


def ours(arch: str, *, unit_rows: bool = False, **cfg) -> SAE:
    g = torch.Generator().manual_seed(0)
    c = SAEConfig(architecture=arch, d_in=D, d_sae=M, k=K if "topk" in arch else None, **cfg)
    w_dec = torch.randn(M, D, generator=g) * 0.4
    if unit_rows:
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    arrays = {
        "W_enc": torch.randn(D, M, generator=g) * 0.4,
        "W_dec": w_dec,
        "b_enc": torch.randn(M, generator=g) * 0.1,
        "b_dec": torch.randn(D, generator=g),
        "threshold": torch.rand(M, generator=g) * 0.5
        if arch != "batchtopk"
        else torch.full((M,), 0.2),
    }
    return SAE.from_arrays(c, arrays).eval()


def x_batch(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(7)) * 2


@pytest.mark.parametrize(
    "name, arch, k",
    [
        ("standard", "relu", None),
        ("jumprelu", "jumprelu", None),
        ("topk", "topk", 4),
        ("batchtopk", "batchtopk", 4),
        ("gated", "jumprelu", None),  # a Gated SAE is exactly a JumpReLU
    ],
)
def test_their_trainers_output_loads_with_their_encodings(
    name: str, arch: str, k: int | None
) -> None:
    expected = load_file(FIXTURES / "expected.safetensors")
    sae = io.load(FIXTURES / name)  # the folder holding trainer_0/
    want = expected[name]
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(sae.encode(expected["x"]).detach(), want, **TOL)
    c = sae.cfg
    assert (c.architecture, c.k, c.d_in, c.d_sae) == (arch, k, 16, 32)
    assert (c.model, c.layer) == ("EleutherAI/pythia-70m-deduped", 3)
    assert c.extra["dictionary_learning"]["trainer"]["submodule_name"] == "resid_post_layer_3"


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk", "batchtopk"])
def test_round_trip_through_ae_pt_keeps_encodings(tmp_path: Path, arch: str) -> None:
    sae = ours(arch, unit_rows=True, apply_b_dec_to_input=arch != "jumprelu", model="gpt2",
               layer=2, site="resid_post")  # fmt: skip
    out = io.save(sae, tmp_path / "trainer_0", format="dictionary_learning")
    assert sorted(p.name for p in out.iterdir()) == ["ae.pt", "config.json"]
    trainer = json.loads((out / "config.json").read_text())["trainer"]
    assert trainer["dict_class"] == {"relu": "AutoEncoder", "jumprelu": "JumpReluAutoEncoder",
                                     "topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE"}[arch]  # fmt: skip
    back = io.load(out)
    assert (back.cfg.architecture, back.cfg.k, back.cfg.site) == (arch, sae.cfg.k, "resid_post")
    x = x_batch()
    torch.testing.assert_close(back.encode(x), sae.encode(x), **TOL)
    torch.testing.assert_close(back(x), sae(x), **TOL)


# What `import dictionary_learning.utils` needs (its __init__ and utils import nnsight, datasets and
# zstandard at module level), pinned to versions known to import; installed with torch pinned to ours.
DL_IMPORTS = ["einops==0.8.2", "pyyaml==6.0.4", "pydantic==2.14.4", "accelerate==1.15.0",
              "transformers==5.24.0", "python-socketio[client]==5.18.1", "pillow==13.0.0",
              "datasets==5.2.0", "zstandard==0.25.0"]  # fmt: skip
PROBE = "import dictionary_learning.utils"
# Run in that venv: load_dictionary(folder), then its encode and forward of x, saved to out.
LOAD_AND_ENCODE = """
import sys, torch
from dictionary_learning.utils import load_dictionary
folder, x, out = sys.argv[1:]
ae, _ = load_dictionary(folder, device="cpu")
x = torch.load(x, weights_only=True)
with torch.no_grad():
    torch.save({"encode": ae.encode(x), "forward": ae(x)}, out)
"""


@pytest.fixture(scope="session")
def dl_python() -> Path:
    """The python of a venv with dictionary-learning 0.1.0 and our torch (see `toolenv`)."""
    return tool_python(
        "dictionary-learning-0.1.0",
        [
            ["--no-deps", "dictionary-learning==0.1.0", "nnsight==0.3.7"],
            [f"torch=={TORCH}", *DL_IMPORTS],
        ],
        PROBE,
    )


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk", "batchtopk"])
def test_saved_folder_loads_in_dictionary_learning_with_same_encodings(
    tmp_path: Path, arch: str, dl_python: Path
) -> None:
    sae = ours(arch, unit_rows=True, input_scale=2.0 if arch != "relu" else 1.0,
               apply_b_dec_to_input=arch == "relu")  # fmt: skip
    out = io.save(sae, tmp_path / "trainer_0", format="dictionary_learning")
    x = x_batch()
    torch.save(x, tmp_path / "x.pt")
    args = [out, tmp_path / "x.pt", tmp_path / "theirs.pt"]
    subprocess.run([dl_python, "-c", LOAD_AND_ENCODE, *args], check=True)
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    want = sae.encode(x).detach()
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(theirs["encode"], want, **TOL)
    torch.testing.assert_close(theirs["forward"], sae(x).detach(), **TOL)


def test_conversions_that_would_change_encodings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"rescales an AutoEncoder's decoder columns to unit norm"):
        io.save(ours("relu"), tmp_path / "a", format="dictionary_learning")
    per_latent = ours("batchtopk")
    with torch.no_grad():
        per_latent.threshold[0] = 0.7
    with pytest.raises(ValueError, match=r"BatchTopKSAE keeps one non-negative threshold"):
        io.save(per_latent, tmp_path / "b", format="dictionary_learning")
    negative = ours("jumprelu")
    with torch.no_grad():
        negative.threshold[0] = -0.1
    with pytest.raises(ValueError, match=r"negative thresholds"):
        io.save(negative, tmp_path / "c", format="dictionary_learning")
    assert not any(tmp_path.iterdir())


def test_pickled_objects_in_ae_pt_are_refused_not_run(tmp_path: Path) -> None:
    folder = tmp_path / "trainer_0"
    shutil.copytree(FIXTURES / "topk" / "trainer_0", folder)
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, "hook": Exploit()}, folder / "ae.pt")
    with pytest.raises(ValueError, match=r"ae.pt: holds Python objects beyond tensors.*refusing"):
        io.load(folder)
    assert UNPICKLED == []


def test_dict_class_must_match_the_arrays(tmp_path: Path) -> None:
    folder = tmp_path / "trainer_0"
    shutil.copytree(FIXTURES / "jumprelu" / "trainer_0", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "AutoEncoderTopK"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"a AutoEncoderTopK has arrays .*; found \['W_dec'"):
        io.load(folder)
    cfg["trainer"]["dict_class"] = "MatryoshkaBatchTopKSAE"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"dict_class 'MatryoshkaBatchTopKSAE' is not supported"):
        io.load(folder)


# What dictionary_learning 0.1.0's `utils.load_dictionary` reads from config.json, by dict_class:
# `trainer.dict_class` always, `trainer.k` for the top-k classes (passed to `from_pretrained`, which
# refuses a k other than the state dict's). Everything else it takes from ae.pt, via a strict
# `load_state_dict` into the class.
READ_BY_LOAD_DICTIONARY = {
    "AutoEncoder": ("dict_class",),
    "JumpReluAutoEncoder": ("dict_class",),
    "AutoEncoderTopK": ("dict_class", "k"),
    "BatchTopKSAE": ("dict_class", "k"),
}


def their_files(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    state = torch.load(folder / "ae.pt", map_location="cpu", weights_only=True)
    return state, json.loads((folder / "config.json").read_text())


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert (g.shape, g.dtype) == (w.shape, w.dtype), name
        assert torch.equal(g, w), f"{name}: differs by up to {(g - w).abs().max()}"


@pytest.mark.parametrize("name", ["standard", "jumprelu", "topk", "batchtopk"])
def test_written_back_is_what_dictionary_learning_wrote(tmp_path: Path, name: str) -> None:
    """Read their trainer's output, write it with our writer: the same ae.pt and load_dictionary
    fields as the library wrote, buffers our SAE does not carry (k, TopK's inference threshold, a
    JumpReLU's negative thresholds) included."""
    want_state, want_cfg = their_files(FIXTURES / name / "trainer_0")
    out = io.save(io.load(FIXTURES / name), tmp_path / "trainer_0", format="dictionary_learning")
    got_state, got_cfg = their_files(out)
    assert_same_state(got_state, want_state)
    dict_class = want_cfg["trainer"]["dict_class"]
    for key in READ_BY_LOAD_DICTIONARY[dict_class]:
        assert got_cfg["trainer"][key] == want_cfg["trainer"][key], key
    assert got_cfg["trainer"].items() >= want_cfg["trainer"].items()  # their fields all kept
    # The fixtures exercise what our SAE does not carry: an estimated TopK inference threshold
    # (ours has none) and negative JumpReLU thresholds (ours are clamped at 0).
    if name == "topk":
        assert want_state["threshold"] > 0
    if name == "jumprelu":
        assert (want_state["threshold"] < 0).any()


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_never_estimated_inference_threshold_is_written_back(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "theirs"
    shutil.copytree(FIXTURES / name / "trainer_0", folder)
    state, _ = their_files(folder)
    state["threshold"] = torch.tensor(
        -1.0
    )  # as their trainers leave it before threshold_start_step
    torch.save(state, folder / "ae.pt")
    out = io.save(io.load(folder), tmp_path / "trainer_0", format="dictionary_learning")
    assert_same_state(their_files(out)[0], state)


def test_kept_negative_jumprelu_threshold_gives_way_to_an_edited_one(tmp_path: Path) -> None:
    want, _ = their_files(FIXTURES / "jumprelu" / "trainer_0")
    sae = io.load(FIXTURES / "jumprelu")
    i = int((want["threshold"] < 0).nonzero()[0])
    with torch.no_grad():
        sae.threshold[i] = 0.3
    out = io.save(sae, tmp_path / "trainer_0", format="dictionary_learning")
    got = their_files(out)[0]["threshold"]
    assert got[i] == 0.3
    others = torch.arange(len(got)) != i
    assert torch.equal(got[others], want["threshold"][others])


def test_gated_is_written_as_the_jumprelu_dictionary_learning_would_load_identically(
    tmp_path: Path,
) -> None:
    """A GatedAutoEncoder is written as a JumpReluAutoEncoder (our writer has no Gated form): the
    state dict their JumpReluAutoEncoder holds (keys, shapes, dtypes as their trainer wrote in the
    JumpReLU fixture), with the values of the documented conversion, and encodings equal to those
    their `load_dictionary` gave for the Gated original."""
    g, _ = their_files(FIXTURES / "gated" / "trainer_0")
    out = io.save(io.load(FIXTURES / "gated"), tmp_path / "trainer_0", format="dictionary_learning")
    got, cfg = their_files(out)
    jumprelu, jumprelu_cfg = their_files(FIXTURES / "jumprelu" / "trainer_0")
    assert sorted(got) == sorted(jumprelu)
    assert {n: (t.shape, t.dtype) for n, t in got.items()} == {
        n: (t.shape, t.dtype) for n, t in jumprelu.items()
    }
    assert cfg["trainer"]["dict_class"] == jumprelu_cfg["trainer"]["dict_class"]
    scale = g["r_mag"].exp()
    w_enc = g["encoder.weight"].T * scale
    assert torch.equal(got["W_enc"], w_enc)
    assert torch.equal(got["W_dec"], g["decoder.weight"].T)
    assert torch.equal(got["b_dec"], g["decoder_bias"])
    assert torch.equal(got["threshold"], (g["mag_bias"] - scale * g["gate_bias"]).clamp(min=0))
    torch.testing.assert_close(got["b_enc"], g["mag_bias"] - g["decoder_bias"] @ w_enc, **TOL)
    # JumpReluAutoEncoder.encode as from_pretrained leaves it (apply_b_dec_to_input False).
    expected = load_file(FIXTURES / "expected.safetensors")
    pre = expected["x"] @ got["W_enc"] + got["b_enc"]
    their_encode = torch.relu(pre * (pre > got["threshold"]))
    assert (expected["gated"] > 0).any()
    torch.testing.assert_close(their_encode, expected["gated"], **TOL)
