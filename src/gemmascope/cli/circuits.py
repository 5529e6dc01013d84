"""`gemmascope graph`: an attribution graph through MLP transcoders, and interventions on it."""

from __future__ import annotations

from typing import Any

import typer

from gemmascope.circuits.job import GraphJob
from gemmascope.cli.flags import command


def register(app: typer.Typer, echo: Any) -> None:
    """Add the circuits commands to `app`; `echo` prints a rich table."""

    @command(app.command("graph"), GraphJob)
    def graph(job: GraphJob) -> None:
        """Trace the attribution graph of a prompt through MLP transcoders (circuit-tracer's method
        and file format); --ablate/--steer rerun the model with latents changed."""
        from rich.table import Table

        from gemmascope.circuits.job import run_graph

        out = run_graph(job)
        g, frontend = out["graph"], out["frontend"]
        scores = g.info["scores"]
        kept = sum(1 for n in frontend["nodes"] if n["feature_type"] == "cross layer transcoder")
        typer.echo(f"{g.n_pos} tokens, {g.n_features:,} active latents, {len(g.logit_ids)} logit "
                   f"targets, {g.info['seconds']:.1f} s; replacement score "
                   f"{scores['replacement']:.3f}, completeness {scores['completeness']:.3f}; "
                   f"pruned to {kept} latents and {len(frontend['links'])} edges")  # fmt: skip
        table = Table("next token", "probability", title="top logits (the graph's targets)")
        for tok, p in zip(g.logit_tokens, g.logit_probs.tolist(), strict=True):
            table.add_row(repr(tok), f"{p:.3f}")
        echo(table)
        if "intervention" in out:
            r, decode = out["intervention"], out["decode"]
            table = Table("clean", "p", "logit shift", "changed", "p",
                          title=f"with {len(r['changes'])} latent(s) changed")  # fmt: skip
            for (i, p, _), (j, q, _) in zip(r["clean"], r["changed"], strict=True):
                table.add_row(repr(decode(i)), f"{p:.3f}", f"{r['logit_shift'][i]:+.3f}",
                              repr(decode(j)), f"{q:.3f}")  # fmt: skip
            echo(table)
