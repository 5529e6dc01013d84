"""The report's figures, drawn on bare matplotlib `Figure`s with the Agg canvas (no global backend
is changed); each function saves its PNGs into a folder and returns `(file name, caption)` pairs."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from gemmascope.evaluate.results import site_label

Record = dict[str, Any]

METRICS: list[tuple[str, str]] = [
    ("delta_lm_loss", "ΔLM loss (nats)"), ("fvu", "FVU"), ("ce_loss_score", "ce_loss_score"),
    ("kl_div_score", "kl_div_score"), ("explained_variance", "explained variance"),
    ("cossim", "cossim"), ("l2_ratio", "l2_ratio"),
    ("relative_reconstruction_bias", "relative reconstruction bias"), ("frac_alive", "frac_alive"),
    ("freq_over_1_percent", "freq_over_1_percent"),
    ("mean_absorption_fraction_score", "absorption fraction"),
    ("mean_full_absorption_score", "full absorption"),
    ("sae_top_1_test_accuracy", "sparse probing top-1 accuracy"),
    ("autointerp_score", "autointerp score"),
]  # fmt: skip
"""What the L0 figures plot: our metrics and SAEBench's (looked up under `saebench`); a metric no
record has is left out."""


def metric(r: Record, name: str) -> float | None:
    """A record's metric: ours at the top level, else SAEBench's of that name (core categories,
    absorption's means, sparse probing's SAE accuracies, auto-interpretation's scores)."""
    if r.get(name) is not None:
        return r[name]
    found = r.get("saebench") or {}
    groups = [*(found.get("core") or {}).values(), (found.get("absorption") or {}).get("mean") or {},
              (found.get("sparse_probing") or {}).get("sae") or {}, found.get("autointerp") or {}]  # fmt: skip
    for group in groups:
        if group.get(name) is not None:
            return group[name]
    return None


def width_label(width: int) -> str:
    """Gemma Scope's width names: 16384 -> `16k`, 2**20 -> `1m`, other sizes as they are."""
    if width % (1 << 20) == 0:
        return f"{width >> 20}m"
    return f"{width >> 10}k" if width % 1024 == 0 else str(width)


_STYLE = {"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
          "grid.alpha": 0.3, "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8}  # fmt: skip


def _groups(records: list[Record], with_model: bool) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for r in records:
        label = f"{r.get('model')} · {site_label(r)}" if with_model else site_label(r)
        groups.setdefault(label, []).append(r)
    return dict(sorted(groups.items()))


def _save(fig: Any, folder: Path, stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) + ".png"
    fig.savefig(folder / name, dpi=110, bbox_inches="tight", facecolor="white")
    return name


def l0_figures(
    plt: Any, records: list[Record], folder: Path, with_model: bool
) -> list[tuple[str, str]]:
    """Per site and width, every metric against L0, one line per layer through its SAEs in L0
    order, coloured by layer: all layers of a site in one figure, as the Gemma Scope paper draws."""
    import matplotlib

    figures = []
    for i, (label, group) in enumerate(_groups(records, with_model).items()):
        for width in sorted({r["width"] for r in group}):
            rows = [r for r in group if r["width"] == width and r.get("l0") is not None]
            names = [(m, n) for m, n in METRICS if any(metric(r, m) is not None for r in rows)]
            if not rows or not names:
                continue
            layers = sorted({r.get("layer") for r in rows if r.get("layer") is not None})
            norm = matplotlib.colors.Normalize(
                min(layers, default=0), max(max(layers, default=0), 1)
            )
            cmap = matplotlib.colormaps["viridis"]
            l0s = [r["l0"] for r in rows if r["l0"] > 0]
            log_x = bool(l0s) and max(l0s) / min(l0s) > 20
            ncols = min(len(names), 4)
            nrows = math.ceil(len(names) / ncols)
            with matplotlib.rc_context(_STYLE):
                fig = plt.Figure(
                    figsize=(3.1 * ncols + 1.2, 2.5 * nrows + 0.5), layout="constrained"
                )
                axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True).ravel()
                for ax, (name, title) in zip(axes, names, strict=False):
                    for layer in layers or [None]:
                        pts = sorted((r["l0"], v) for r in rows if r.get("layer") == layer
                                     and (v := metric(r, name)) is not None)  # fmt: skip
                        if pts:
                            color = cmap(norm(layer or 0))
                            ax.plot(*zip(*pts, strict=True), color=color, marker="o",
                                    markersize=3, linewidth=1.2, alpha=0.85)  # fmt: skip
                    ax.set_title(title)
                    if log_x:
                        ax.set_xscale("log")
                        _plain_log_ticks(ax.xaxis)
                    ax.tick_params(labelbottom=True)
                for ax in axes[len(names) :]:
                    ax.set_visible(False)
                fig.supxlabel("L0 (active latents per token)", fontsize=9)
                fig.suptitle(f"{label} · width {width_label(width)}", fontsize=11,
                             fontweight="bold", x=0.01, ha="left")  # fmt: skip
                if layers:
                    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap),
                                 ax=axes.tolist(), label="layer")  # fmt: skip
            caption = (f"{label}, width {width_label(width)}: each metric against L0, one line per "
                       "layer (ours: ΔLM loss, FVU, explained variance; the rest are SAEBench's)")  # fmt: skip
            figures.append((_save(fig, folder, f"l0_{i}_{label}_{width_label(width)}"), caption))
    return figures


def _plain_log_ticks(axis: Any) -> None:
    """Ticks at 1, 2, 5 x 10^k labelled plainly (an L0 reads better as 20 than as 2x10^1)."""
    import matplotlib.ticker as ticker

    axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(ticker.NullFormatter())


def layer_figure(plt: Any, records: list[Record], folder: Path) -> tuple[str, str]:
    import matplotlib

    sites = sorted({site_label(r) for r in records})
    colors = {s: matplotlib.colormaps["tab10"](j % 10) for j, s in enumerate(sites)}
    metrics = (("l0", "L0"), ("fvu", "FVU"), ("delta_lm_loss", "ΔLM loss"),
               ("frac_recovered", "loss recovered"))  # fmt: skip
    with matplotlib.rc_context(_STYLE):
        fig = plt.Figure(figsize=(11, 6.4), layout="constrained")
        axes = fig.subplots(2, 2).ravel()
        for ax, (metric, name) in zip(axes, metrics, strict=True):
            for site, color in colors.items():
                pts = sorted((r["layer"], r[metric]) for r in records if site_label(r) == site
                             and r.get(metric) is not None and r.get("layer") is not None)  # fmt: skip
                if not pts:
                    continue
                ax.scatter(*zip(*pts, strict=True), s=18, color=color, alpha=0.6, linewidths=0)
                by_layer: dict[int, list[float]] = {}
                for layer, v in pts:
                    by_layer.setdefault(layer, []).append(v)
                med = sorted((k, sorted(v)[len(v) // 2]) for k, v in by_layer.items())
                ax.plot(*zip(*med, strict=True), color=color, linewidth=1.4, label=site)
            ax.set_title(name)
            ax.set_xlabel("layer")
            layers = sorted({r["layer"] for r in records if r.get("layer") is not None})
            if 0 < len(layers) <= 20:
                ax.set_xticks(layers)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, title="site", loc="outside right upper", frameon=False)
    caption = "Each dot is an SAE; lines join the median per layer of each site"
    return _save(fig, folder, "by_layer"), caption


def density_figures(
    plt: Any, records: list[Record], folder: Path, with_model: bool
) -> list[tuple[str, str]]:
    import matplotlib

    figures = []
    for i, (label, group) in enumerate(_groups(records, with_model).items()):
        hists = [r for r in group if r.get("density_hist") and sum(r["density_hist"]["counts"])]
        if not hists:
            continue
        layers = sorted({r.get("layer") for r in hists}, key=lambda v: (v is None, v))
        l0s = [max(r["l0"], 1e-3) for r in hists]
        norm = matplotlib.colors.LogNorm(min(l0s), max(l0s) * 1.0001)
        cmap = matplotlib.colormaps["viridis"]
        lo = min(_first_bin(r) for r in hists)
        ncols = min(len(layers), 4)
        nrows = math.ceil(len(layers) / ncols)
        with matplotlib.rc_context(_STYLE):
            fig = plt.Figure(figsize=(2.8 * ncols + 1.2, 2.3 * nrows + 0.5), layout="constrained")
            axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True).ravel()
            for ax, layer in zip(axes, layers, strict=False):
                for r in (r for r in hists if r.get("layer") == layer):
                    edges, counts = r["density_hist"]["log10_edges"], r["density_hist"]["counts"]
                    share = [c / r["width"] for c in counts[lo:]]
                    ax.stairs(
                        share, edges[lo:], color=cmap(norm(max(r["l0"], 1e-3))), linewidth=1.1
                    )
                ax.set_title(f"layer {layer}")
            for ax in axes[len(layers) :]:
                ax.set_visible(False)
            for ax in axes[::ncols]:
                ax.set_ylabel("share of latents")
            fig.supxlabel(
                "log10 feature density (share of tokens a latent is active on)", fontsize=9
            )
            fig.suptitle(label, fontsize=11, fontweight="bold", x=0.01, ha="left")
            bar = fig.colorbar(
                matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes.tolist(), label="L0"
            )
            _plain_log_ticks(bar.ax.yaxis)
        caption = f"{label}: how often latents fire, one line per SAE (dead latents left out); mass near 0 means dense latents"
        figures.append((_save(fig, folder, f"density_{i}_{label}"), caption))
    return figures


def _first_bin(r: Record) -> int:
    counts = r["density_hist"]["counts"]
    return next((j for j, c in enumerate(counts) if c), 0)
