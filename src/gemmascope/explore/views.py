"""Small presentation helpers for the explorer's templates: number formats, token display, histogram bars."""

from __future__ import annotations

from typing import Any

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM = 640, 220, 44, 24


def num(x: float | None) -> str:
    """Three significant digits, no exponent for everyday magnitudes."""
    if x is None:
        return "–"
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"


def pct(density: float) -> str:
    """A firing density as a percentage with sensible precision."""
    p = density * 100
    if p == 0:
        return "0%"
    return f"{p:.3g}%" if p >= 0.01 else f"{p:.1e}%"


def alpha(act: float, scale: float) -> str:
    """Highlight strength of a token: its activation over the scale, clipped to [0, 1]."""
    if scale <= 0 or act <= 0:
        return "0"
    return f"{min(act / scale, 1.0):.3f}"


def tok(text: str, alone: bool = False) -> str:
    """A token's display text: each line break as one ↵ (`\\r\\n` too; a lone `\\r` as ␍) and tabs
    as ⇥, so a context stays on one line; all else as is (spaces are the text's own).

    Inside a context (the default) an empty text stays empty: the token only starts a character
    that the next tokens complete, and the completing token shows it (`tokens.stitch`). A token on
    its own (`alone=True`: a chip, a logit-lens token) is never blank: empty shows as ∅.
    """
    if text == "":
        return "∅" if alone else ""
    return text.replace("\r\n", "↵").replace("\r", "␍").replace("\n", "↵").replace("\t", "⇥")


def short(source: Any) -> str:
    """The last part of a path or repo id, for headers; the full name goes in a tooltip."""
    text = str(source or "")
    return text.rstrip("/").rsplit("/", 1)[-1] or text


def register_filters(env: Any) -> None:
    """Make the helpers available to the templates (autoescaping still applies to their output)."""
    env.filters.update(num=num, pct=pct, tok=tok, short=short)
    env.globals.update(alpha=alpha)


DENSITY_DECADES = 8
"""The density histogram's bins: one per decade from 1e-8 to 1, dead latents apart."""


def density_bars(densities: list[float]) -> dict[str, Any]:
    """Geometry of the SAE page's histogram of log10 firing densities (as Gemma Scope's figures),
    with the number of latents that never fired."""
    import math

    bins_per_decade = 4
    n = DENSITY_DECADES * bins_per_decade
    counts = [0] * n
    dead = 0
    for d in densities:
        if d <= 0:
            dead += 1
            continue
        b = math.floor((math.log10(d) + DENSITY_DECADES) * bins_per_decade)
        counts[min(max(b, 0), n - 1)] += 1
    out = histogram_bars({"hi": float(n), "counts": counts}, float(n), full=True)
    for t in out["x_ticks"]:
        t["label"] = f"1e{float(t['label']) / bins_per_decade - DENSITY_DECADES:.0f}"
    for i, (b, c) in enumerate(zip(out["bars"], counts, strict=False)):
        lo = i / bins_per_decade - DENSITY_DECADES
        b["title"] = f"density 10^{lo:g} to 10^{lo + 1 / bins_per_decade:g}: {c:,} latents"
    return out | {"dead": dead}


def histogram_bars(histogram: dict[str, Any], max_act: float, full: bool = False) -> dict[str, Any]:
    """Geometry of an SVG bar chart of the activation histogram, bins up to the maximum only.

    Returns:
        `width`, `height`, `bars` (x, y, w, h, title), `x_ticks` (x, label, anchor), `y_max` and `plot`
        (the plot area's left, top, right, bottom), or an empty `bars` list for a dead latent.
    """
    counts, hi = list(histogram["counts"]), float(histogram["hi"])
    out: dict[str, Any] = {"width": WIDTH, "height": HEIGHT, "bars": [], "x_ticks": [], "y_max": 0}
    if hi <= 0 or not any(counts):
        return out
    last = len(counts) - 1 if full else max(i for i, c in enumerate(counts) if c)
    counts = counts[: last + 1]
    bin_width = hi / len(histogram["counts"])
    left, right, top, bottom = PAD_LEFT, WIDTH - 8, 8, HEIGHT - PAD_BOTTOM
    step = (right - left) / len(counts)
    y_max = max(counts)
    for i, c in enumerate(counts):
        h = (bottom - top) * c / y_max
        lo, up = i * bin_width, (i + 1) * bin_width
        out["bars"].append({"x": round(left + i * step + 0.5, 2), "w": round(max(step - 1, 0.5), 2),
                            "y": round(bottom - h, 2), "h": round(h, 2),
                            "title": f"{num(lo)} – {num(up)}: {c:,} tokens"})  # fmt: skip
    span = len(counts) * bin_width
    for frac, anchor in ((0.0, "start"), (0.25, "middle"), (0.5, "middle"), (0.75, "middle"),
                         (1.0, "end")):  # fmt: skip
        x = round(left + frac * (right - left), 2)
        out["x_ticks"].append({"x": x, "label": num(frac * span), "anchor": anchor})
    out.update(y_max=y_max, plot={"left": left, "top": top, "right": right, "bottom": bottom},
               max_x=round(left + min(max_act / span, 1.0) * (right - left), 2))  # fmt: skip
    return out
