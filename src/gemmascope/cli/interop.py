"""`gemmascope export-neuronpedia` and `import-examples`: feature indexes to and from others' files.

Both configs live with their library code (`gemmascope.explore.neuronpedia.NeuronpediaExport`,
`gemmascope.explore.examples.ExamplesImport`); their fields are the flags, checked before any work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import typer

from gemmascope.cli.flags import command
from gemmascope.explore.examples import ExamplesImport
from gemmascope.explore.neuronpedia import NeuronpediaExport


def register(app: typer.Typer, echo: Any) -> None:
    """Add the interop commands to `app`; `echo` prints a rich table (unused: both print a line)."""

    @command(app.command("export-neuronpedia"), NeuronpediaExport)
    def export_neuronpedia(cfg: NeuronpediaExport) -> None:
        """Write a feature index as Neuronpedia imports it (or as SAEDashboard's batch-N.json)."""
        from gemmascope.explore.neuronpedia import MARKER, export_neuronpedia, read_marker

        out = export_neuronpedia(**dataclasses.asdict(cfg))
        done = read_marker(out / MARKER)
        where = f"{done['model_id']}/{done['source_id']}"
        typer.echo(f"wrote {out}: {done['features']:,} latents in {done['batches']} batch(es), "
                   f"layout {cfg.layout}, source {where}")  # fmt: skip

    @command(app.command("import-examples"), ExamplesImport)
    def import_examples(cfg: ExamplesImport) -> None:
        """Turn Gemma Scope 2's examples.safetensors into an index for `gemmascope explore`."""
        from gemmascope.explore.examples import import_examples

        out = import_examples(**dataclasses.asdict(cfg))
        typer.echo(f"index written: {out} (open it with `gemmascope explore {out}`)")
