"""Circuits: attribution graphs through MLP transcoders, as circuit-tracer and Neuronpedia draw them.

The modules: `replacement` (the model with its MLPs replaced by transcoders plus errors, attention
patterns and norm scales frozen, so that the residual stream is linear in the active latents),
`attribution` (the direct effect of every node on every latent and logit, batched backward passes),
`graph` (pruning by influence, the replacement and completeness scores, circuit-tracer's JSON) and
`intervene` (the model rerun with chosen latents ablated or steered).
"""

from gemmascope.circuits.attribution import attribute
from gemmascope.circuits.graph import Graph, Pruned

__all__ = ["Graph", "Pruned", "attribute"]
