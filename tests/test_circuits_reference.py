"""Our attribution graph against circuit-tracer 0.5.0's (nnsight backend) on the same tiny Gemma 3,
prompt and transcoders: the same active latents and logit targets, latent and error edges equal,
token edges a factor sqrt(d_model) apart (its nnsight backend reads the token rows of the embedding
matrix without Gemma's sqrt(d_model) scale, which the model applies before block 0; ours includes
it). circuit-tracer runs in a venv of its own (`toolenv`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, tiny_tokenizer
from test_circuits import transcoders
from toolenv import circuit_tracer_python, for_transformers_4

from gemmascope import io
from gemmascope.circuits import attribute

# In circuit-tracer's venv: its attribution of ids through the transcoder set, saved.
THEIRS = """
import sys, glob, os, torch, yaml
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
folder, tset, ids, out = sys.argv[1:]
cfg = yaml.safe_load(open(os.path.join(tset, "config.yaml")))
paths = {int(p.rsplit("_", 1)[1].split(".")[0]): p for p in glob.glob(f"{tset}/layer_*.safetensors")}
tcs = load_transcoder_set(paths, scan=cfg["scan"], feature_input_hook=cfg["feature_input_hook"],
    feature_output_hook=cfg["feature_output_hook"], device=torch.device("cpu"), dtype=torch.float32,
    lazy_encoder=False, lazy_decoder=False)
model = ReplacementModel.from_pretrained_and_transcoders(folder, tcs, backend="nnsight",
    device=torch.device("cpu"), dtype=torch.float32)
g = attribute(torch.load(ids), model, max_n_logits=10, desired_logit_prob=0.95, batch_size=64)
torch.save({"adjacency": g.adjacency_matrix, "features": g.active_features[g.selected_features],
            "logits": torch.tensor([t.vocab_idx for t in g.logit_targets]),
            "probs": g.logit_probabilities}, out)
"""


@pytest.mark.slow
def test_graph_equals_circuit_tracers(tmp_path: Path) -> None:
    python = circuit_tracer_python()
    model, tcs = build_tiny("gemma3"), transcoders()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    for_transformers_4(tmp_path / "model")
    io.save_transcoders(tcs, tmp_path / "set")
    ids = torch.tensor([2, 5, 9, 13, 7, 22, 31, 8, 40])  # BOS first: both leave it without latents
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([python, "-c", THEIRS, tmp_path / "model", tmp_path / "set", tmp_path / "ids.pt",
                    tmp_path / "theirs.pt"], check=True)  # fmt: skip
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    ours = attribute(model, tiny_tokenizer(), ids, tcs, progress=False)
    assert torch.equal(theirs["features"].long(), ours.features)
    assert torch.equal(theirs["logits"], ours.logit_ids)
    torch.testing.assert_close(theirs["probs"], ours.logit_probs, rtol=1e-5, atol=1e-7)
    F, L, T, K = ours.n_features, ours.n_layers, ours.n_pos, len(ours.logit_ids)
    a = theirs["adjacency"]  # (N, N): rows for latents, then errors and tokens (empty), then logits
    rows = torch.cat([torch.arange(F), torch.arange(len(a) - K, len(a))])
    a = a[rows][:, : F + L * T + T]
    scale = float(ours.adjacency.abs().max())
    torch.testing.assert_close(ours.adjacency[:, : F + L * T], a[:, : F + L * T], rtol=1e-4,
                               atol=1e-6 * scale)  # fmt: skip
    sqrt_d = model.config.hidden_size**0.5
    torch.testing.assert_close(ours.adjacency[:, F + L * T :], a[:, F + L * T :] * sqrt_d,
                               rtol=1e-4, atol=1e-6 * scale)  # fmt: skip
    assert float(a[:, F + L * T :].abs().max()) > 1e-3  # token edges exist: the check can fail
