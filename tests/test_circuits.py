"""Attribution graphs on known answers: edges sum to their targets (the replacement model is exactly
linear in its sources), exact transcoders leave no error, batched backward passes equal one
target at a time and a finite difference, pruning and the frontend JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import build_tiny, tiny_tokenizer
from test_evaluate import _mlp_transcoder, _relu_gpt2

from gemmascope.circuits import Graph, attribute
from gemmascope.circuits.replacement import prepare, run
from gemmascope.clt import CLT
from gemmascope.hooks import collect, run_until_head
from gemmascope.sae import SAE, SAEConfig

IDS = torch.tensor([5, 9, 13, 7, 22, 31, 8, 40])  # no special token: every position has latents


def transcoders(
    d: int = 32, m: int = 64, layers: int = 3, seed: int = 0, b_dec: bool = False
) -> list[SAE]:
    """Random JumpReLU skip transcoders; `b_dec` zero unless asked (it is a constant, no node)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        cfg = SAEConfig("jumprelu", d_in=d, d_sae=m, layer=layer, site="mlp_in",
                        target_site="mlp_out", skip_connection=True)  # fmt: skip
        out.append(SAE.from_arrays(cfg, {
            "W_enc": torch.randn(d, m, generator=g) * 0.5, "W_dec": torch.randn(m, d, generator=g) * 0.3,
            "b_enc": torch.randn(m, generator=g) * 0.1,
            "b_dec": torch.randn(d, generator=g) * 0.1 if b_dec else torch.zeros(d),
            "threshold": torch.rand(m, generator=g) * 0.3, "W_skip": torch.randn(d, d, generator=g) * 0.2,
        }))  # fmt: skip
    return out


def random_clt(
    d: int = 32, m: int = 64, layers: int = 3, seed: int = 0, b_dec: bool = False
) -> CLT:
    """A random JumpReLU skip CLT whose latents write every later layer too."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig("jumprelu", d_in=d, d_sae=m, layer=0, site="mlp_in", target_site="mlp_out",
                    skip_connection=True, n_layers=layers)  # fmt: skip
    return CLT.from_arrays(cfg, {
        "W_enc": torch.randn(layers, d, m, generator=g) * 0.5,
        "b_enc": torch.randn(layers, m, generator=g) * 0.1,
        "threshold": torch.rand(layers, m, generator=g) * 0.3,
        "b_dec": torch.randn(layers, d, generator=g) * 0.1 if b_dec else torch.zeros(layers, d),
        "W_skip": torch.randn(layers, d, d, generator=g) * 0.2,
        **{f"W_dec_{i}": torch.randn(m, layers - i, d, generator=g) * 0.2 for i in range(layers)},
    })  # fmt: skip


def _encoders(tcs: list[SAE] | CLT) -> list[torch.Tensor]:
    return list(tcs.W_enc) if isinstance(tcs, CLT) else [t.W_enc for t in tcs]


def _pre(model: Any, graph: Graph, tcs: list[SAE] | CLT) -> torch.Tensor:
    """Each active latent's pre-activation less its bias, from a clean forward."""
    acts = collect(model, graph.ids[None], [(layer, "mlp_in") for layer in range(graph.n_layers)])
    W_enc = _encoders(tcs)
    return torch.tensor([float(acts[layer, "mlp_in"][0, p] @ W_enc[layer][:, f])
                         for layer, p, f in graph.features.tolist()])  # fmt: skip


@pytest.mark.parametrize(
    "family, kind",
    [("llama", "transcoders"), ("gemma2", "transcoders"), ("gemma3", "transcoders"),
     ("gemma3", "clt")],
)  # fmt: skip
def test_edges_into_each_target_sum_to_it(family: str, kind: str) -> None:
    """Without biases, the replacement model is linear and homogeneous in its sources (latents,
    errors, tokens), so a target's incoming edges sum to its value. A pattern or a norm scale left
    unfrozen would break this; so would a CLT latent's write to a later layer left out."""
    model = build_tiny(family)
    tcs = transcoders() if kind == "transcoders" else random_clt()
    graph = attribute(model, tiny_tokenizer(), IDS, tcs, progress=False)
    F = graph.n_features
    assert F > 100 and len(graph.logit_ids) >= 1
    torch.testing.assert_close(
        graph.adjacency[:F].sum(1), _pre(model, graph, tcs), rtol=1e-4, atol=2e-4
    )
    final = run_until_head(model, lambda: model(input_ids=IDS[None]))[0, -1]
    head = model.get_output_embeddings().weight
    want = (head[graph.logit_ids] - head.mean(0)) @ final
    torch.testing.assert_close(graph.adjacency[F:].sum(1), want.detach(), rtol=1e-4, atol=2e-4)
    scores = graph.scores()
    assert 0 < scores["replacement"] < 1 and 0 < scores["completeness"] < 1  # random: errors count


def test_mlps_that_are_their_transcoders_leave_no_error() -> None:
    model = _relu_gpt2()
    tcs = [_mlp_transcoder(model, layer) for layer in range(3)]
    graph = attribute(model, tiny_tokenizer(), IDS, tcs, progress=False)
    F, LT = graph.n_features, graph.n_layers * graph.n_pos
    assert graph.adjacency[:, F : F + LT].abs().max() == 0
    assert graph.scores() == {"replacement": 1.0, "completeness": 1.0}


@pytest.mark.parametrize("kind", ["transcoders", "clt"])
def test_an_edge_is_the_finite_difference_with_everything_else_frozen(kind: str) -> None:
    """Moving one source latent by eps moves a later target's pre-activation by eps * edge / a."""
    model = build_tiny("gemma3")
    tcs = transcoders(b_dec=True) if kind == "transcoders" else random_clt(b_dec=True)
    graph = attribute(model, tiny_tokenizer(), IDS, tcs, progress=False)
    layers = graph.features[:, 0]
    s = int(torch.nonzero(layers == 0)[3])  # a source in layer 0
    targets = torch.nonzero(
        (layers == 2) & (graph.features[:, 1] >= graph.features[s, 1])
    ).flatten()
    t = int(targets[graph.adjacency[targets, s].abs().argmax()])  # the target it moves most
    layer, pos, feat = graph.features[s].tolist()
    folded = prepare(tcs, 3)
    eps = 1e-2

    def target_pre(bump: float) -> float:  # the frozen forward, with the source's activation moved
        special = torch.zeros(len(IDS), dtype=torch.bool)
        shift = {(j, pos): bump * w[feat] for j, w in folded.writes[layer]}  # every MLP it writes
        rep = run(model, IDS, folded, special, shift=shift)
        tl, tp, tf = graph.features[t].tolist()
        return float(rep.mlp_in[tl][0, tp] @ folded.encoders[tl].W_enc[:, tf])

    finite = (target_pre(eps) - target_pre(-eps)) / (2 * eps)
    a = float(graph.activations[s])
    assert finite == pytest.approx(float(graph.adjacency[t, s]) / a, rel=1e-3, abs=1e-5)
    assert abs(finite) > 1e-3  # the check can fail


def test_batched_rows_equal_one_target_at_a_time() -> None:
    model, tcs = build_tiny("llama"), transcoders()
    whole = attribute(model, tiny_tokenizer(), IDS, tcs, batch_size=64, progress=False)
    single = attribute(model, tiny_tokenizer(), IDS, tcs, batch_size=1, progress=False)
    torch.testing.assert_close(whole.adjacency, single.adjacency, rtol=1e-4, atol=1e-5)


def test_pruning_keeps_tokens_and_logits_and_the_json_follows_circuit_tracers_schema(
    tmp_path,
) -> None:
    model, tcs = build_tiny("gemma3"), transcoders()
    graph = attribute(model, tiny_tokenizer(), IDS, tcs, progress=False)
    pruned = graph.prune(0.8, 0.98)
    N, T, K = graph.node_count(), graph.n_pos, len(graph.logit_ids)
    assert pruned.nodes[N - T - K :].all()
    assert 0 < int(pruned.nodes[: graph.n_features].sum()) < graph.n_features
    assert float(pruned.cumulative.max()) == pytest.approx(1.0)
    data = graph.frontend_json("test", scan="tiny/transcoders")
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert (
        data["metadata"]["prompt_tokens"] == graph.tokens
        and data["metadata"]["schema_version"] == 1
    )
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    logit = next(n for n in data["nodes"] if n["is_target_logit"])
    assert logit["node_id"] == f"4_{int(graph.logit_ids[0])}_{T - 1}" and logit["layer"] == "4"
    feature = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, feat, pos = (int(v) for v in feature["node_id"].split("_"))
    assert feature["feature"] == (layer + feat) * (layer + feat + 1) // 2 + feat
    back = Graph.load(graph.save(tmp_path / "g"))
    torch.testing.assert_close(back.adjacency, graph.adjacency)
    assert back.tokens == graph.tokens and json.dumps(back.frontend_json("t", scan="s"))


@pytest.mark.parametrize("kind", ["transcoders", "clt"])
def test_interventions_change_what_the_graph_says_they_should(kind: str) -> None:
    """Setting a latent to its own value changes nothing; zeroing the latent that pushes the top
    logit hardest (a latent at the last position; for the CLT one of layer 0, through the later
    layers it writes) lowers that logit's lead."""
    from gemmascope.circuits.intervene import Change, intervene

    model = build_tiny("gemma3")
    tcs = transcoders() if kind == "transcoders" else random_clt()
    graph = attribute(model, tiny_tokenizer(), IDS, tcs, progress=False)
    F, T = graph.n_features, graph.n_pos
    layer = 2 if kind == "transcoders" else 0
    last = torch.nonzero(
        (graph.features[:, 0] == layer) & (graph.features[:, 1] == T - 1)
    ).flatten()
    s = int(last[graph.adjacency[F, last].argmax()])  # the strongest push on the top logit
    layer, pos, latent = graph.features[s].tolist()
    same = intervene(model, IDS, tcs, [Change(layer, latent, float(graph.activations[s]), pos)])
    assert max(abs(v) for v in same["logit_shift"].values()) < 1e-4
    top = int(graph.logit_ids[0])
    r = intervene(model, IDS, tcs, [Change(layer, latent, 0.0, pos)])
    lead = r["logit_shift"][top] - sum(r["logit_shift"].values()) / len(r["logit_shift"])
    assert float(graph.adjacency[F, s]) > 0 and lead < 0
    with pytest.raises(ValueError, match="no latent 9999 at layer 2"):
        intervene(model, IDS, tcs, [Change(2, 9999)])
    with pytest.raises(ValueError, match=r"expected LAYER:LATENT=VALUE\[@POSITION\]"):
        Change.parse("2:5", ablate=False)
    assert Change.parse("2:5@3", ablate=True) == Change(2, 5, 0.0, 3)


def test_cli_graph_writes_the_graph_and_reruns_with_an_ablation(tmp_path, tiny_folder) -> None:
    from typer.testing import CliRunner

    from gemmascope import io
    from gemmascope.cli import app

    io.save_transcoders(transcoders(), tmp_path / "set")
    args = ["graph", "--model", str(tiny_folder), "--prompt", "w5 w9 w13 w7 w22", "--transcoders",
            str(tmp_path / "set"), "--out", str(tmp_path / "g"), "--ablate", "1:3"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "replacement score" in result.output and "latent(s) changed" in result.output
    names = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert names == [
        "graph-metadata.json",
        "graph.json",
        "graph.safetensors",
        "w5-w9-w13-w7-w22.json",
    ]
    graph = Graph.load(tmp_path / "g")
    assert graph.n_pos == 6 and graph.tokens[0] == "<bos>"
    bad = CliRunner().invoke(app, [*args[:-1], "1:x"])
    assert bad.exit_code == 2 and "expected LAYER:LATENT[@POSITION]" in bad.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    taken = CliRunner().invoke(app, [*args[:-4], "--out", str(tmp_path / "other")])
    assert taken.exit_code == 2 and "is not a graph folder" in taken.output
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_cli_trains_a_clt_beside_the_transcoders_and_graphs_through_it(
    tmp_path, tiny_folder
) -> None:
    """cache -> `train --cross-layer also` (one read: a transcoder per layer and a CLT) -> `graph`
    through the run's CLT (`--pick clt_`) with an ablation."""
    from typer.testing import CliRunner

    from gemmascope import io
    from gemmascope.cli import app

    corpus, cache, run = tmp_path / "words.txt", tmp_path / "cache", tmp_path / "run"
    corpus.write_text(" ".join(f"w{3 + i % 60}" for i in range(3000)))
    invoke = CliRunner().invoke
    result = invoke(app, ["cache", "--model", str(tiny_folder), "--layers", "0-2", "--sites",
                          "mlp_in,mlp_out", "--tokens", "1024", "--corpus", str(corpus),
                          "--context-size", "16", "--out", str(cache)])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = invoke(app, ["train", "--activations", str(cache), "--layers", "0-2", "--sites",
                          "mlp_in", "--target-site", "mlp_out", "--cross-layer", "also", "--widths",
                          "64", "--target-l0", "5", "--tokens", "2048", "--batch-size", "128",
                          "--out", str(run)])  # fmt: skip
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in run.iterdir() if (p / "cfg.json").exists())
    assert names == ["clt_0-2_mlp_in_to_mlp_out_w64_jumprelu_l0_5",
                     *[f"layer_{i}_mlp_in_to_mlp_out_w64_jumprelu_l0_5" for i in range(3)]]  # fmt: skip
    assert isinstance(io.load(run / names[0]), CLT)
    args = ["graph", "--model", str(tiny_folder), "--prompt", "w5 w9 w13 w7 w22", "--transcoders",
            str(run), "--out", str(tmp_path / "g")]  # fmt: skip
    both = invoke(app, args)
    assert both.exit_code == 2 and "pass `pick`" in both.output
    result = invoke(app, [*args, "--pick", "clt_", "--ablate", "0:3"])
    assert result.exit_code == 0, result.output
    graph = Graph.load(tmp_path / "g")
    assert graph.info["cross_layer"] and graph.n_layers == 3
    assert "replacement score" in result.output and "latent(s) changed" in result.output


def test_max_feature_nodes_expands_the_most_influential_latents_first(tmp_path) -> None:
    """With a cap, the rows computed are the full graph's rows of the latents chosen, and the
    first ones chosen are those of most influence through the logits' rows."""
    from gemmascope.circuits.graph import influence

    model, tcs = build_tiny("gemma3"), transcoders()
    full = attribute(model, tiny_tokenizer(), IDS, tcs, progress=False)
    F, K = full.n_features, len(full.logit_ids)
    capped = attribute(model, tiny_tokenizer(), IDS, tcs, batch_size=8, max_feature_nodes=20,
                       progress=False)  # fmt: skip
    assert capped.adjacency.shape == (20 + K, full.adjacency.shape[1])
    torch.testing.assert_close(capped.adjacency[:20], full.adjacency[capped.expanded])
    torch.testing.assert_close(capped.adjacency[20:], full.adjacency[F:])
    logits = full.adjacency[F:].abs()
    norm = logits / logits.sum(1, keepdim=True)
    rows = torch.arange(full.node_count() - K, full.node_count())
    score = influence(norm, rows, full.logit_probs.float(), full.node_count(), full.n_layers)[:F]
    assert sorted(capped.expanded.tolist()) == sorted(score.topk(20).indices.tolist())
    assert 0 < capped.scores()["replacement"] <= 1
    data = capped.frontend_json("capped", scan="tiny")
    assert any(n["feature_type"] == "cross layer transcoder" for n in data["nodes"])
    back = Graph.load(capped.save(tmp_path / "g"))
    assert torch.equal(back.expanded, capped.expanded)
    almost = attribute(model, tiny_tokenizer(), IDS, tcs, max_feature_nodes=F - 1, progress=False)
    R = len(almost.expanded)  # every latent that reaches the logits, and no other
    assert R == int((full.influence()[:F] > 0).sum()) < F - 1
    torch.testing.assert_close(almost.adjacency[:R], full.adjacency[almost.expanded])
