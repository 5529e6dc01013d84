"""MkDocs hook: the CLI reference (docs/cli.md) is generated from the `gemmascope` command itself.

Each subcommand's `--help`, as click formats it without colour, replaces the marker
`<!-- cli-reference -->` at build time, so the page can never disagree with the code.
"""

from __future__ import annotations

import re
from typing import Any

MARKER = "<!-- cli-reference -->"


def cli_reference() -> str:
    """Markdown: one section per subcommand, with its help text and usage in a text block."""
    import typer.main

    from gemmascope.cli import app

    # Plain help, as without rich installed: rich draws panels meant for a terminal.
    saved, app.rich_markup_mode = app.rich_markup_mode, None
    try:
        group = typer.main.get_command(app)
    finally:
        app.rich_markup_mode = saved
    root = group.make_context("gemmascope", [], resilient_parsing=True, terminal_width=100)
    return "\n\n".join([_help_block(group, root), *_sections(group, root, "gemmascope")]) + "\n"


def _sections(group: Any, parent: Any, path: str) -> list[str]:
    """A section per subcommand of `group`, depth first (a subcommand may be a group itself)."""
    out = []
    for name in group.list_commands(parent):
        command = group.get_command(parent, name)
        if command is None or command.hidden:
            continue
        ctx = command.make_context(name, [], parent=parent, resilient_parsing=True)
        summary = (command.help or "").strip().splitlines()[0]
        out.append(f"## {path} {name}\n\n{summary}\n\n{_help_block(command, ctx)}")
        if hasattr(command, "list_commands"):
            out += _sections(command, ctx, f"{path} {name}")
    return out


def _help_block(command: Any, ctx: Any) -> str:
    return "```text\n" + _unstyle(command.get_help(ctx)).rstrip() + "\n```"


def _unstyle(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == "cli.md":
        if MARKER not in markdown:
            raise ValueError(f"docs/cli.md lost its marker {MARKER!r}; the reference goes there")
        return markdown.replace(MARKER, cli_reference())
    return markdown
