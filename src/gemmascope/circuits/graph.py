"""An attribution graph: its nodes and direct-effect edges, pruning by influence on the logits, the
replacement and completeness scores, and the JSON that circuit-tracer's frontend and Neuronpedia's
graph viewer read.

Nodes, in the order of circuit-tracer's adjacency matrix: the F active latents (by layer, position,
latent), the L x T error nodes (layer-major), the T token embeddings and the K logits. Only latents
and logits receive edges, so the matrix is kept as its rows (the latents whose incoming edges were
computed, `expanded`: all of them unless `max_feature_nodes` capped it, then the logits) by its
`F + L T + T` source columns; `adjacency[r, s]` is the direct effect of source s on row r's node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gemmascope.common.files import atomic_dir


@dataclass
class Graph:
    """The attribution graph of one prompt."""

    prompt: str
    ids: Tensor  # (T,) token ids
    tokens: list[str]  # (T,) each id decoded
    features: Tensor  # (F, 3) layer, position, latent of each active latent
    activations: Tensor  # (F,)
    logit_ids: Tensor  # (K,)
    logit_probs: Tensor  # (K,)
    logit_tokens: list[str]
    adjacency: Tensor  # (R + K, F + L * T + T)
    n_layers: int
    info: dict[str, Any] = field(default_factory=dict)
    """Where it came from: model, transcoders, timings, scores."""
    expanded: Tensor | None = None
    """(R,) the latents (indices into `features`) that have a row, in row order; None: all F."""

    @property
    def row_nodes(self) -> Tensor:
        """(R + K,) the node of each row of `adjacency`: the expanded latents, then the logits."""
        F, N, K = self.n_features, self.node_count(), len(self.logit_ids)
        latents = torch.arange(F) if self.expanded is None else self.expanded.long()
        return torch.cat([latents, torch.arange(N - K, N)])

    @property
    def n_pos(self) -> int:
        return len(self.ids)

    @property
    def n_features(self) -> int:
        return len(self.features)

    def node_count(self) -> int:
        return self.adjacency.shape[1] + len(self.logit_ids)

    # ------------------------------------------------------------ influence, pruning, scores
    def normalized(self, adjacency: Tensor | None = None) -> Tensor:
        """|A| with each target's incoming weights summing to one."""
        return normalized(self.adjacency if adjacency is None else adjacency)

    def influence(self, norm: Tensor | None = None) -> Tensor:
        """Each node's total (indirect) influence on the logits, weighted by their probabilities:
        w A + w A^2 + ... over the normalised matrix; `[N]` in node order."""
        norm = self.normalized() if norm is None else norm
        return influence(norm, self.row_nodes, self.logit_probs.float(), self.node_count(),
                         self.n_layers)  # fmt: skip

    def scores(self) -> dict[str, float]:
        """circuit-tracer's replacement score (the share of the influence on the logits that reaches
        the tokens rather than the errors) and completeness score (the share of each node's incoming
        weight not from errors, weighted by the node's influence)."""
        norm = self.normalized()
        inf = self.influence(norm)
        F, LT, T = self.n_features, self.n_layers * self.n_pos, self.n_pos
        err, tok = inf[F : F + LT].sum(), inf[F + LT : F + LT + T].sum()
        weight = inf.clone()
        weight[-len(self.logit_ids) :] += self.logit_probs.float()
        from_errors = torch.zeros(self.node_count())
        from_errors[self.row_nodes] = norm[:, F : F + LT].sum(1)
        return {
            "replacement": float(tok / (tok + err).clamp_min(1e-12)),
            "completeness": float(((1 - from_errors) * weight).sum() / weight.sum()),
        }

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
        """Keep the nodes holding `node_threshold` of the influence on the logits (tokens and logits
        always) and the edges holding `edge_threshold` of the influence through edges, then drop
        latents and errors left without a kept outgoing edge (latents also without an incoming one)."""
        for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not 0 <= t <= 1:
                raise ValueError(f"`{name}` must be in [0, 1], got {t}")
        F, LT, T, K = self.n_features, self.n_layers * self.n_pos, self.n_pos, len(self.logit_ids)
        N = self.node_count()
        inf = self.influence()
        nodes = inf >= _threshold(inf, node_threshold)
        nodes[N - T - K :] = True
        row_nodes = self.row_nodes
        a = self.adjacency * nodes[row_nodes][:, None] * nodes[: N - K][None, :]
        norm = self.normalized(a)
        inf2 = self.influence(norm)
        row_inf = inf2[row_nodes]
        row_inf[-K:] += self.logit_probs.float()
        edge_score = norm * row_inf[:, None]  # (R, C)
        edges = edge_score >= _threshold(edge_score.flatten(), edge_threshold)
        edges &= edge_score > 0
        while True:  # drop nodes left dangling until nothing changes
            has_out = edges.any(0)  # (C,)
            has_in = torch.zeros(N, dtype=torch.bool)
            has_in[row_nodes] = edges.any(1)
            before = nodes.clone()
            nodes[:F] &= has_out[:F] & has_in[:F]
            nodes[F : F + LT] &= has_out[F : F + LT]
            edges &= nodes[row_nodes][:, None] & nodes[: N - K][None, :]
            if torch.equal(before, nodes):
                break
        order = torch.argsort(inf, descending=True)
        cumulative = torch.empty_like(inf)
        cumulative[order] = inf[order].cumsum(0) / inf.sum().clamp_min(1e-12)
        return Pruned(nodes, edges, cumulative)

    # ------------------------------------------------------------ files
    def save(self, folder: Path, frontend: dict[str, Any] | None = None) -> Path:
        """The whole graph (tensors as safetensors, the rest as JSON) and, given `frontend_json`'s
        output, `{slug}.json` and `graph-metadata.json` for circuit-tracer's frontend; atomically.
        A folder holding anything else is refused rather than replaced."""
        folder = Path(folder)
        if folder.exists() and not (folder / "graph.safetensors").is_file():
            if any(folder.iterdir()):
                raise ValueError(f"{folder}: exists and is not a graph folder; choose a new path")
        from safetensors.torch import save_file

        tensors = {"ids": self.ids, "features": self.features, "activations": self.activations,
                   "logit_ids": self.logit_ids, "logit_probs": self.logit_probs,
                   "adjacency": self.adjacency,
                   **({} if self.expanded is None else {"expanded": self.expanded})}  # fmt: skip
        meta = {"prompt": self.prompt, "tokens": self.tokens, "logit_tokens": self.logit_tokens,
                "n_layers": self.n_layers, "info": self.info}  # fmt: skip
        with atomic_dir(folder) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "graph.safetensors")
            (tmp / "graph.json").write_text(json.dumps(meta, indent=2))
            if frontend is not None:
                slug = frontend["metadata"]["slug"]
                (tmp / f"{slug}.json").write_text(json.dumps(frontend))
                listing = {
                    "graphs": [{k: v for k, v in frontend["metadata"].items() if k != "info"}]
                }
                (tmp / "graph-metadata.json").write_text(json.dumps(listing, indent=2))
        return folder

    @classmethod
    def load(cls, folder: Path) -> Graph:
        from safetensors.torch import load_file

        if not (folder / "graph.safetensors").is_file():
            raise ValueError(f"{folder}: no graph.safetensors; write one with `gemmascope graph`")
        t = load_file(folder / "graph.safetensors")
        meta = json.loads((folder / "graph.json").read_text())
        return cls(meta["prompt"], t["ids"], meta["tokens"], t["features"], t["activations"],
                   t["logit_ids"], t["logit_probs"], meta["logit_tokens"], t["adjacency"],
                   meta["n_layers"], meta.get("info", {}), t.get("expanded"))  # fmt: skip

    def frontend_json(
        self, slug: str, *, scan: str, node_threshold: float = 0.8, edge_threshold: float = 0.98
    ) -> dict[str, Any]:
        """The pruned graph in the schema circuit-tracer's `create_graph_files` writes (metadata,
        qParams, nodes, links), which its frontend and Neuronpedia's graph viewer read."""
        pruned = self.prune(node_threshold, edge_threshold)
        F, T, L, K = self.n_features, self.n_pos, self.n_layers, len(self.logit_ids)
        N = self.node_count()
        ids: dict[int, str] = {}
        nodes = []
        for i in torch.nonzero(pruned.nodes).flatten().tolist():
            node = self._node(i, F, T, L, K, N)
            node["influence"] = None if i >= N - K else float(pruned.cumulative[i])
            ids[i] = node["node_id"]
            nodes.append(node)
        rows = self.row_nodes
        links = []
        for r, c in torch.nonzero(pruned.edges).tolist():
            target, source = int(rows[r]), int(c)
            if target in ids and source in ids:
                weight = float(self.adjacency[r, c])
                links.append({"source": ids[source], "target": ids[target], "weight": weight})
        return {
            "metadata": {
                "slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": self.tokens,
                "prompt": self.prompt, "node_threshold": node_threshold, "schema_version": 1,
                "info": self.info,
            },
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                        "sg_pos": ""},
            "nodes": nodes,
            "links": links,
        }  # fmt: skip

    def _node(self, i: int, F: int, T: int, L: int, K: int, N: int) -> dict[str, Any]:
        base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                "clerp": "", "activation": None}  # fmt: skip
        if i < F:
            layer, pos, feat = (int(v) for v in self.features[i])
            return {**base, "node_id": f"{layer}_{feat}_{pos}", "feature": _cantor(layer, feat),
                    "layer": str(layer), "ctx_idx": pos, "feature_type": "cross layer transcoder",
                    "jsNodeId": f"{layer}_{feat}-0", "activation": float(self.activations[i])}  # fmt: skip
        if i < F + L * T:
            layer, pos = divmod(i - F, T)
            return {**base, "node_id": f"0_{layer}_{pos}", "feature": -1, "layer": str(layer),
                    "ctx_idx": pos, "feature_type": "mlp reconstruction error",
                    "jsNodeId": f"{layer}_{pos}-0"}  # fmt: skip
        if i < N - K:
            pos = i - F - L * T
            tok = int(self.ids[pos])
            return {**base, "node_id": f"E_{tok}_{pos}", "feature": pos, "layer": "E",
                    "ctx_idx": pos, "feature_type": "embedding", "jsNodeId": f"E_{tok}-{pos}"}  # fmt: skip
        k = i - (N - K)
        vocab, prob = int(self.logit_ids[k]), float(self.logit_probs[k])
        return {**base, "node_id": f"{L + 1}_{vocab}_{T - 1}", "feature": vocab,
                "layer": str(L + 1), "ctx_idx": T - 1, "feature_type": "logit",
                "jsNodeId": f"L_{vocab}-{T - 1}", "token_prob": prob, "is_target_logit": k == 0,
                "clerp": f'Output "{self.logit_tokens[k]}" (p={prob:.3f})'}  # fmt: skip


@dataclass
class Pruned:
    nodes: Tensor  # (N,) bool, node order
    edges: Tensor  # (R + K, F + L T + T) bool, as the adjacency
    cumulative: Tensor  # (N,) share of the influence held by the nodes at least as influential


def normalized(adjacency: Tensor) -> Tensor:
    """|A| with each row's (target's) incoming weights summing to one."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def influence(norm: Tensor, row_nodes: Tensor, logit_probs: Tensor, n_nodes: int,
              n_layers: int) -> Tensor:  # fmt: skip
    """`[n_nodes]`: each node's influence on the logits through the rows of the normalised
    adjacency `norm [R + K, C]` whose nodes are `row_nodes` (the last K are the logits)."""
    K = len(logit_probs)
    weights = torch.cat([torch.zeros(len(row_nodes) - K), logit_probs])  # on each row
    total = torch.zeros(n_nodes)
    for _ in range(n_layers + 2):  # the graph is layered: paths are at most L + 1 edges
        reached = weights @ norm  # (C,) influence on each source through one more edge
        total[: reached.numel()] += reached
        weights = torch.cat([reached[row_nodes[:-K]], torch.zeros(K)])
        if not bool(weights.any()):
            break
    return total


def _threshold(scores: Tensor, share: float) -> float:
    """The score at which the most influential entries first hold `share` of the total."""
    ordered = scores.sort(descending=True).values
    cum = ordered.cumsum(0) / ordered.sum().clamp_min(1e-12)
    i = int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype)).clamp(max=len(cum) - 1))
    return float(ordered[i])


def _cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b
