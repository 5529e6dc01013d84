"""Evaluate SAEs on held-out tokens: reconstruction, sparsity, latent health and faithfulness.

Conventions (Gemma Scope's where it had one):

- Tokens are sequences packed from the corpus's `eval` split (`corpus.pack_sequences`). BOS, EOS and
  pad positions ("special") are left out of every metric: the SAEs never see them, and splices and
  ablations leave their activations clean, since Gemma Scope neither trained on nor spliced the BOS.
- Next-token cross-entropy is averaged over the positions whose activation was replaced (token not
  special) and whose label (the next token) exists and is not padding. The same positions are
  scored clean, spliced, zero- and mean-ablated, so the losses compare like with like.
- Logits are never materialised for a whole batch: the forward stops at the output embedding and
  cross-entropy and KL run through it `ce_chunk` positions at a time (memory about 3 x ce_chunk x
  vocab x 4 bytes), with the model's final logit soft-capping where it has one.
- One clean forward per batch serves every SAE (sites sharing a layer are read once); spliced and
  ablated forwards resume from the spliced layer (`hooks.run_from`). Zero and mean ablation depend
  only on the site, so they run once per distinct (layer, site), whatever the number of SAEs there;
  a third ablation zeroes the site at every position, special ones too, as SAEBench's does. The
  final hidden states of a batch's spliced and ablated forwards are kept until its logits are
  scored (`[n, d_model]` each), so the clean distribution is computed once per chunk for all.
  The mean for mean ablation comes from a first pass that stops after the deepest site.

Metrics, over the n evaluated tokens x (d wide), reconstructions x_hat and residuals r = x - x_hat:
`mse` = sum ||r||^2 / (n d); `fvu` = sum ||r||^2 / sum ||x - mean x||^2; `explained_variance` =
1 - sum ||r - mean r||^2 / sum ||x - mean x||^2 (sklearn's; unlike 1 - fvu it forgives a constant
offset); `cosine` and `relative_norm` are token means of cos(x, x_hat) and ||x_hat|| / ||x||; `l0`
is the mean count of non-zero latents per token. `delta_lm_loss` = ce_spliced - ce_clean;
`frac_recovered` = (ce_zero - ce_spliced) / (ce_zero - ce_clean), `frac_recovered_mean` the same
with ce_mean. `dead` latents are never active, `dense` ones on more than 10% of tokens; the density
histogram counts live latents by log10 of the share of tokens they are active on.

Transcoders (`cfg.target_site`, e.g. `mlp_in -> mlp_out`) are scored against their target: x above
is the target's activation, x_hat the transcoder's output (skip included), the splice replaces the
target (the MLP's whole output: the model runs with that MLP replaced) and the ablations zero or
mean-ablate the target, i.e. the MLP.

Each record also carries SAEBench's core metrics under its names and definitions
(`record["saebench"]["core"]`, see `saebench`), and `write_saebench` writes them as SAEBench's result
files. `EvalConfig.evals` adds SAEBench's feature absorption (`record["saebench"]["absorption"]`) and
sparse probing (`record["saebench"]["sparse_probing"]`) and auto-interpretation
(`record["saebench"]["autointerp"]`).

The modules: `config` (what an evaluation reads), `passes` (the forwards), `metrics` (running sums
and the record of each SAE), `saebench` (SAEBench's core metrics), `saebench_files` (its result
files), `extras` (the evaluations after the core passes): `absorption` with `spelling`, `probing`,
and `autointerp` with `explainer` (the LLM endpoint) and `explanations` (stored in a feature index);
`feature_stats` (per-latent contexts, shared with the feature index), `results` (the results file
and the sources it names).
"""

from gemmascope.evaluate.config import EvalConfig
from gemmascope.evaluate.metrics import DENSE_ABOVE, DENSITY_EDGES, token_losses
from gemmascope.evaluate.passes import evaluate, evaluate_sequences
from gemmascope.evaluate.results import expand_sources, read_results, write_results
from gemmascope.evaluate.saebench_files import write_saebench

__all__ = [
    "DENSE_ABOVE",
    "DENSITY_EDGES",
    "EvalConfig",
    "evaluate",
    "evaluate_sequences",
    "expand_sources",
    "read_results",
    "token_losses",
    "write_results",
    "write_saebench",
]
