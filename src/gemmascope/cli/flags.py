"""A command from a config dataclass: one flag per field, read and checked by the config itself.

`command(app.command("cache"), CacheConfig)(run)` registers `gemmascope cache` with a flag for every field
of `CacheConfig` (nested configs flattened, see `gemmascope.common.config`); the command builds the
config from what was typed, which checks every value before any work, and calls `run(cfg)`. A bad
value ends the command with its message and exit status 2, never a traceback.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Optional

import typer

from gemmascope.common import config as C


def fail(message: str) -> None:
    """Print a clear error (no traceback) and exit with status 2."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


USER_ERRORS = (OSError, ValueError, RuntimeError, ImportError)
"""What a library call raises for bad input or a bad environment: shown as a message, exit 2.
Anything else (a `KeyError`, a `TypeError`) is a bug and keeps its traceback."""


def command(
    register: Callable[[Callable[..., Any]], Any], config: type, *, group: bool = False
) -> Callable[[Callable[[Any], Any]], Any]:
    """Register `run(cfg: config)` with typer's `register` (`app.command("name")`); its docstring
    is the command's help. A `run(cfg, given)` also gets the flat names of the flags typed. With `group`, it is a group's callback that steps aside for a subcommand."""

    def decorate(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
        leaves = C.leaves(config)
        wants_given = len(inspect.signature(run).parameters) == 2  # run(cfg, flags typed)

        def callback(ctx: typer.Context, **typed: Any) -> None:
            if group and ctx.invoked_subcommand is not None:
                return
            missing = [_flag(leaf) for leaf in leaves if leaf.required and typed[leaf.name] is None]
            if missing:
                fail(f"{', '.join(missing)} required: see `--help`")
            values = {}
            for leaf in leaves:
                raw = typed[leaf.name]
                if raw is None or raw == []:
                    continue
                try:
                    values[leaf.name] = _read(leaf, raw)
                except ValueError as e:
                    fail(
                        f"unknown {_flag(leaf)} {e}"
                        if C.is_choice(leaf.type)
                        else f"{_flag(leaf)}: {e}"
                    )
            try:
                cfg = C.build(config, values)
            except ValueError as e:
                fail(str(e))
                return
            try:
                run(cfg, frozenset(values)) if wants_given else run(cfg)
            except USER_ERRORS as e:
                fail(str(e))

        ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=typer.Context)  # fmt: skip
        params = [ctx, *(_parameter(leaf, not group) for leaf in leaves)]
        callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        callback.__annotations__ = {p.name: p.annotation for p in params}
        callback.__doc__ = run.__doc__
        callback.__name__ = getattr(run, "__name__", "command")
        callback.__wrapped_config__ = config  # type: ignore[attr-defined]
        register(callback)
        return run

    return decorate


def _flag(leaf: C.Leaf) -> str:
    return leaf.name.upper() if leaf.positional else "--" + leaf.name.replace("_", "-")


def _read(leaf: C.Leaf, raw: Any) -> Any:
    if C.is_bool(leaf.type):
        return bool(raw)
    if C.is_list(leaf.type):  # repeated flags and comma-separated lists both work
        return [v for part in raw for v in C.parse_value(leaf.type, part)]
    return C.parse_value(leaf.type, raw)


def _parameter(leaf: C.Leaf, enforce: bool) -> inspect.Parameter:
    """A typer parameter whose value is None (or []) unless the flag was given; click itself
    insists on the required ones when `enforce` (a group's callback checks them itself)."""
    default = "" if leaf.default is C.MISSING else C.show_value(leaf.type, leaf.default)
    if leaf.positional:
        many = C.is_list(leaf.type)
        info: Any = typer.Argument(
            ... if leaf.required and enforce else None, help=leaf.help,
            show_default=False,
        )  # fmt: skip
        annotation: Any = list[str] if many else Optional[str]  # noqa: UP045 - typer on 3.10
        return inspect.Parameter(leaf.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                 annotation=annotation)  # fmt: skip
    flag = _flag(leaf)
    if C.is_bool(leaf.type):
        names = [f"{flag}/--no-{flag[2:]}", *(f"{a}/--no-{a[2:]}" for a in leaf.flags)]
        shown = False if leaf.default is None else flag if leaf.default else f"--no-{flag[2:]}"
        info = typer.Option(None, *names, help=leaf.help, show_default=shown)
        annotation = Optional[bool]  # noqa: UP045
    else:
        many = C.is_list(leaf.type)
        info = typer.Option(
            ... if leaf.required and enforce else None, flag, *leaf.flags,
            help=leaf.help + (" Comma-separated, or the flag repeated." if many else ""),
            show_default=(default or False) if not leaf.required else False,
            metavar=C.metavar(leaf.type),
        )  # fmt: skip
        annotation = Optional[list[str]] if many else Optional[str]  # noqa: UP045
    return inspect.Parameter(leaf.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=annotation)  # fmt: skip
