"""The shape of the package: one-way imports, small modules, and every option declared once."""

from __future__ import annotations

import ast
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemmascope.activations import CacheConfig
from gemmascope.cli import app
from gemmascope.common import config as C

SRC = Path(__file__).parents[1] / "src" / "gemmascope"
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every gemmascope module -> the gemmascope modules it imports, at the top or inside functions
    (a package's `__init__` counts as imported with any of its submodules)."""
    files = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                parts = name.split(".")
                for i in range(2, len(parts) + 1):  # the packages on the way, then the module
                    target = ".".join(parts[:i])
                    if target in files and target != mod and not mod.startswith(target + "."):
                        graph[mod].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_module_imports_one_that_imports_it_back() -> None:
    cycle = _cycle(_imports())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_400_lines() -> None:
    long = {
        _module(p): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules: {long}"


def _configs() -> dict[str, type]:
    """Each command's config, from the commands themselves."""
    import typer.main

    group = typer.main.get_command(app)
    out = {}
    for name, cmd in {**group.commands, **group.commands["suite"].commands}.items():
        out[name] = cmd.callback.__wrapped_config__  # type: ignore[union-attr]
    return out


def test_every_flag_has_help_and_no_default_is_written_into_it() -> None:
    """Help comes from the field's docstring; the default is shown from the field, never restated
    as a number in the text (where it would drift from the code)."""
    for command, config in _configs().items():
        for leaf in C.leaves(config):
            assert leaf.help, f"`gemmascope {command} --{leaf.name}` has no docstring"
            assert not re.search(r"\(\d[\d.e+-]*\)", leaf.help), (
                f"{command} --{leaf.name}: {leaf.help}"
            )


def test_every_command_that_runs_a_model_defaults_to_auto_device() -> None:
    devices = {c: leaf.default for c, cfg in _configs().items() for leaf in C.leaves(cfg)
               if leaf.name == "device"}  # fmt: skip
    assert set(devices) >= {"cache", "train", "eval", "index", "explore", "model", "suite"}
    assert set(devices.values()) == {"auto"}, devices


@dataclass
class _Grown(CacheConfig):
    new_knob: int = 3
    """A knob added to a config, and nothing else."""


def test_a_field_added_to_a_config_is_a_flag_with_its_help() -> None:
    import typer

    from gemmascope.cli.flags import command

    seen: list[_Grown] = []
    probe = typer.Typer(rich_markup_mode=None)  # plain help text, one option a line
    command(probe.command("probe"), _Grown)(seen.append)
    probe.command("other")(lambda: None)  # a group, as the real app is
    help_ = CliRunner().invoke(probe, ["probe", "--help"], terminal_width=200)
    assert "--new-knob" in help_.output and "A knob added to a config" in help_.output
    done = CliRunner().invoke(probe, ["probe", "--out", "x", "--new-knob", "7", "--tokens", "2k"])
    assert done.exit_code == 0, done.output
    assert seen[0].new_knob == 7 and seen[0].tokens == 2000 and seen[0].out == Path("x")
    bad = CliRunner().invoke(probe, ["probe", "--out", "x", "--new-knob", "seven"])
    assert bad.exit_code == 2 and "--new-knob: 'seven' is not a number" in bad.output


def test_nested_configs_flatten_to_the_flags_users_type() -> None:
    from gemmascope.suite import SuiteConfig

    names = {leaf.name for leaf in C.leaves(SuiteConfig)}
    for flag in ("tokens", "train_tokens", "eval_tokens", "lr", "batch_size", "model_batch_size",
                 "cache_dtype", "center", "standardize", "ablations", "matmul_dtype"):  # fmt: skip
        assert flag in names, flag
    assert "cache_model" not in names and "eval_corpus" not in names  # the suite sets those


@pytest.mark.parametrize("text,count,width", [("16k", 16_000, 16_384), ("1m", 1_000_000, 1 << 20)])
def test_counts_are_decimal_and_widths_binary(text: str, count: int, width: int) -> None:
    from gemmascope.common.units import parse_count, parse_width

    assert parse_count(text) == count and parse_width(text) == width


def test_a_field_docstring_is_read_from_the_source() -> None:
    docs = C.field_docs(CacheConfig)
    assert docs["tokens"].startswith("Activation vectors to cache per (layer, site)")
    assert dataclasses.fields(_Grown)[-1].name == "new_knob"
