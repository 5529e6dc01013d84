"""Configs are dataclasses, and each of their fields is a flag of the command line.

A field is declared once: its name is the flag (`batch_size` -> `--batch-size`), its type says how
the flag is read (`Count` takes `250k`, a `list[...]` takes `a,b,c`, a `Literal` lists its choices),
its default is the flag's, and the docstring under it is the flag's help. `gemmascope.cli` builds
every command from these declarations; nothing else restates them.

A config may hold another (`SuiteConfig.train` is a `TrainConfig`): declare it with `nested()`,
and its fields become flags too, named `{prefix}_{field}` unless renamed. One rule keeps a value
from being given twice: a nested field named like a field of the config that holds it is not a
flag, and the holder sets it (with `inherit`). `flat()` gives the flat view by flag name, which is
also what a run's identity is compared on.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import numbers
import textwrap
import types
import typing
from collections.abc import Iterable
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Literal, Union

from gemmascope.common.units import Unit


def option(
    default: Any = MISSING,
    *,
    default_factory: Any = MISSING,
    flags: Iterable[str] = (),
    positional: bool = False,
    required: bool = False,
    cli: bool = True,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field with command-line extras: more `flags` (aliases such as `--dtype`), an
    argument instead of an option (`positional`), a flag that must be given although the field has
    a default for the configs that hold this one (`required`), or no flag (`cli=False`); and the
    bounds its numbers must keep (`ge`, `gt`, `le`, `lt`: >=, >, <=, <), checked by `check`."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"flags": tuple(flags), "positional": positional, "required": required, "cli": cli,
            "bounds": bounds}  # fmt: skip
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def nested(
    cls: type,
    *,
    prefix: str = "",
    rename: dict[str, str] | None = None,
    hide: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    aliases: bool = True,
) -> Any:
    """A field holding a whole config `cls`, whose fields are flags `{prefix}_{name}` (`name`
    without a prefix), or the names in `rename`; `hide` names those the holder sets itself,
    `defaults` replaces some of `cls`'s defaults here, and `aliases=False` drops the other names
    (such as `--dtype`) its fields have on their own command."""
    defaults = dict(defaults or {})
    meta = {"nested": {"cls": cls, "prefix": prefix, "rename": dict(rename or {}),
                       "hide": tuple(hide), "defaults": defaults, "aliases": aliases}}  # fmt: skip
    return dataclasses.field(default_factory=functools.partial(cls, **defaults), metadata=meta)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One flag: where its value goes in the config, how it is read, and its help."""

    name: str
    """Flat name (`train_tokens`); the flag is `--train-tokens`."""
    path: tuple[str, ...]
    """Field names from the outer config down to this field."""
    type: Any
    """The field's type hint, `Annotated` extras included."""
    default: Any
    """Its default (`MISSING` when required)."""
    help: str
    flags: tuple[str, ...]
    """Aliases, e.g. `--dtype` for `--matmul-dtype`."""
    positional: bool
    required: bool


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and of its bases), whitespace collapsed."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return docs


@functools.cache
def _own_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def hints(cls: type) -> dict[str, Any]:
    """The resolved type hint of each field, `Annotated` extras kept."""
    return typing.get_type_hints(cls, include_extras=True)


def leaves(cls: type) -> list[Leaf]:
    """Every flag of config `cls`, nested configs flattened; fails on two flags of one name."""
    out = _leaves(cls, (), "", {}, ())
    seen: dict[str, Leaf] = {}
    for leaf in out:
        for name in (leaf.name, *leaf.flags):
            if name in seen:
                raise TypeError(f"{cls.__name__}: two fields give the flag {name!r}")
            seen[name] = leaf
    return out


def _leaves(
    cls: type,
    path: tuple[str, ...],
    prefix: str,
    rename: dict[str, str],
    hide: tuple[str, ...],
    defaults: dict[str, Any] | None = None,
    aliases: bool = True,
) -> list[Leaf]:
    docs, types_ = field_docs(cls), hints(cls)
    own = {f.name for f in dataclasses.fields(cls)}
    out = []
    for f in dataclasses.fields(cls):
        if f.name in hide or not f.metadata.get("cli", True):
            continue
        if "nested" in f.metadata:
            n = f.metadata["nested"]
            shared = tuple(name for name in _field_names(n["cls"]) if name in own)
            out += _leaves(n["cls"], (*path, f.name), n["prefix"], n["rename"],
                           (*n["hide"], *shared), n["defaults"], n["aliases"])  # fmt: skip
            continue
        name = rename.get(f.name) or (f"{prefix}_{f.name}" if prefix else f.name)
        default = f.default if f.default_factory is MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        keep_aliases = aliases and not prefix and f.name not in rename
        flags = tuple(f.metadata.get("flags", ())) if keep_aliases else ()
        out.append(Leaf(name, (*path, f.name), types_[f.name], default, docs.get(f.name, ""),
                        flags, bool(f.metadata.get("positional")),
                        default is MISSING or bool(f.metadata.get("required"))))  # fmt: skip
    return out


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build(cls: type, values: dict[str, Any]) -> Any:
    """The config `cls` from flat `values` (by `Leaf.name`); absent ones keep their defaults.

    Nested configs are made first, so the outer one's `__post_init__` sees them whole.
    """
    tree: dict[str, Any] = {}
    for leaf in leaves(cls):
        if leaf.name in values:
            node = tree
            for key in leaf.path[:-1]:
                node = node.setdefault(key, {})
            node[leaf.path[-1]] = values[leaf.name]
    return _make(cls, tree)


def _make(cls: type, tree: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            given = {**f.metadata["nested"]["defaults"], **tree.get(f.name, {})}
            kwargs[f.name] = _make(f.metadata["nested"]["cls"], given)
        elif f.name in tree:
            kwargs[f.name] = tree[f.name]
    return cls(**kwargs)


def flat(cfg: Any) -> dict[str, Any]:
    """Every flag's value by flat name, JSON-ready (paths as strings): a run's identity."""
    out = {}
    for leaf in leaves(type(cfg)):
        value = cfg
        for key in leaf.path:
            value = getattr(value, key)
        if isinstance(value, tuple):
            value = list(value)
        out[leaf.name] = str(value) if isinstance(value, Path) else value
    return out


def inherit(holder: Any, *names: str) -> None:
    """Set each field of the nested configs `names` that `holder` also has to `holder`'s value."""
    own = {f.name for f in dataclasses.fields(holder)}
    for name in names:
        child = getattr(holder, name)
        shared = {k: getattr(holder, k) for k in _field_names(type(child)) if k in own}
        setattr(holder, name, dataclasses.replace(child, **shared))


# --- checking values -----------------------------------------------------------------------------
_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}  # fmt: skip


def check(cfg: Any) -> None:
    """Refuse any value that its field's declaration does not allow: a wrong type, a non-finite
    number, a number outside its bounds, a choice not listed. Every config calls this first in its
    `__post_init__`, so a bad value fails before anything is loaded, run or written."""
    types_ = hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if "nested" not in f.metadata:
            _check(f.name, types_[f.name], getattr(cfg, f.name), f.metadata.get("bounds", {}))


def _check(name: str, tp: Any, value: Any, bounds: dict[str, float]) -> None:
    base, _ = _unwrap(tp)
    if value is None:
        if not _optional(tp):
            raise ValueError(f"`{name}` is required, got None")
        return
    origin = typing.get_origin(base)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{name}` must be a list, got {value!r}")
        (item,) = typing.get_args(base)
        for v in value:
            _check(name, item, v, bounds)
        return
    if origin is Literal:
        if value not in typing.get_args(base):
            raise ValueError(
                f"unknown `{name}` {value!r}; choose one of {list(typing.get_args(base))}"
            )
        return
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be true or false, got {value!r}")
        return
    if base is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"`{name}` must be a whole number, got {value!r}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"`{name}` must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value}")
    else:
        return
    for op, bound in bounds.items():
        sign, ok = _OPS[op]
        if not ok(value, bound):
            raise ValueError(f"`{name}` must be {sign} {bound:g}, got {value}")


def _optional(tp: Any) -> bool:
    while typing.get_origin(tp) is typing.Annotated:
        tp = tp.__origin__
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


# --- reading one flag's text ------------------------------------------------------------------


def parse_value(tp: Any, text: str) -> Any:
    """`text` read as type `tp`: units, choices, lists (comma-separated), paths, numbers."""
    tp, extras = _unwrap(tp)
    unit = next((e for e in extras if isinstance(e, Unit)), None)
    if unit is not None:
        return unit.parse(text)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [parse_value(item, t.strip()) for t in text.split(",") if t.strip()]
    if origin is Literal:
        choices = typing.get_args(tp)
        if text not in choices:
            raise ValueError(f"{text!r}; choose one of {list(choices)}")
        return text
    if tp is bool:
        return text.lower() in ("1", "true", "yes", "on")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if tp is Path:
        return Path(text)
    return text


def show_value(tp: Any, value: Any) -> str:
    """A default as its flag would be written (`1M`, `16k`, `a,b`)."""
    tp, extras = _unwrap(tp)
    unit = next((e for e in extras if isinstance(e, Unit)), None)
    if value is None:
        return ""
    if isinstance(value, list):
        (item,) = typing.get_args(tp) or (Any,)
        return ",".join(show_value(item, v) for v in value)
    if unit is not None:
        return unit.show(value)
    return str(value)


def metavar(tp: Any) -> str:
    tp, extras = _unwrap(tp)
    unit = next((e for e in extras if isinstance(e, Unit)), None)
    if unit is not None:
        return unit.metavar
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"{metavar(item)},..."
    if origin is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return {int: "INT", float: "FLOAT", Path: "PATH"}.get(tp, "TEXT")


def is_choice(tp: Any) -> bool:
    return typing.get_origin(_unwrap(tp)[0]) is Literal


def is_bool(tp: Any) -> bool:
    return _unwrap(tp)[0] is bool


def is_list(tp: Any) -> bool:
    return typing.get_origin(_unwrap(tp)[0]) is list


def _unwrap(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    """`Optional[Annotated[X, ...]]` -> (X, extras)."""
    extras: tuple[Any, ...] = ()
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            extras += tp.__metadata__
            tp = tp.__origin__
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp, extras
            tp = args[0]
        else:
            return tp, extras
