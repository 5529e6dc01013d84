"""circuit-tracer's transcoder sets: one folder with `config.yaml` and `layer_{i}.safetensors` for
every layer 0..n-1, as its `TranscoderSet.to_safetensors` and its transcoder cache write them.

Each layer file holds `W_enc [F, d]` (our `W_enc` transposed), `W_dec [F, d]`, `b_enc`, `b_dec`,
`activation_function.threshold` for JumpReLU (relu without it) and, for skip transcoders,
`W_skip [d, d]` applied as `x @ W_skip.T` (our `W_skip` transposed). `config.yaml` names
`model_kind: transcoder_set` and the TransformerLens hooks read and written: `mlp.hook_in` (our
`mlp_in`) and `hook_mlp_out` (our `mlp_out`). Our own fields ride along under a `gemmascope` key,
which circuit-tracer ignores.

Its cross-layer transcoders (`model_kind: cross_layer_transcoder`, its `load_clt`) are one folder of
`W_enc_{i}.safetensors` (`W_enc_{i} [F, d]`, `b_enc_{i}`, `b_dec_{i}`, `threshold_{i}` for JumpReLU)
and `W_dec_{i}.safetensors` (`W_dec_{i} [F, n_layers - i, d]`) per layer; it stores no skip
connection, so a skip CLT is refused.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gemmascope.clt import CLT
from gemmascope.common.files import atomic_dir
from gemmascope.io._common import (
    check_names,
    our_fields,
    read_our_fields,
    read_safetensors,
    site_to_hook,
)
from gemmascope.sae import SAE, SAEConfig

CONFIG = "config.yaml"
_HOOKS = {"mlp_in": "mlp.hook_in", "mlp_out": "hook_mlp_out"}
_IN_HOOKS = {"mlp.hook_in": "mlp_in", "ln2.hook_normalized": "mlp_in"}
_OUT_HOOKS = {"hook_mlp_out": "mlp_out"}
_ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip")
_LAYER_RE = re.compile(r"layer_(\d+)\.safetensors")


def is_transcoder_set(folder: Path) -> bool:
    """Whether `folder` is laid out as a circuit-tracer transcoder set."""
    return (folder / CONFIG).is_file() and any(folder.glob("layer_*.safetensors"))


def is_clt(folder: Path) -> bool:
    """Whether `folder` is laid out as a circuit-tracer cross-layer transcoder."""
    return (folder / "W_enc_0.safetensors").is_file() and (folder / "W_dec_0.safetensors").is_file()


def write_clt(clt: CLT, folder: Path, *, scan: str | None = None) -> Path:
    """Write an `mlp_in -> mlp_out` CLT over layers 0..n-1 as circuit-tracer's `load_clt` reads it."""
    c = clt.cfg
    if (c.site, c.target_site, c.layer) != ("mlp_in", "mlp_out", 0):
        raise ValueError(
            f"{folder}: {clt!r} is not an MLP CLT from layer 0; circuit-tracer's CLTs replace "
            "every MLP (mlp_in -> mlp_out)"
        )
    if c.architecture == "topk" or c.skip_connection:
        raise ValueError(
            f"{folder}: circuit-tracer's CLT files hold JumpReLU or relu latents without a skip "
            f"connection; {clt!r} has {'a skip connection' if c.skip_connection else 'topk'}. "
            "Save it as gemmascope or gemmascope2 instead"
        )
    files: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(clt.n_layers):
        enc = {f"W_enc_{i}": clt.W_enc[i].T, f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i]}
        if c.architecture in ("jumprelu", "batchtopk"):
            enc[f"threshold_{i}"] = clt.threshold[i]
        files[f"W_enc_{i}.safetensors"] = enc
        files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": clt.W_dec[i]}
    config = {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": _HOOKS["mlp_in"],
        "feature_output_hook": _HOOKS["mlp_out"],
        "scan": scan or f"gemmascope/{c.model or 'model'}/clt",
        "gemmascope": our_fields(c),
    }
    _write(folder, files, config)
    return folder


def read_clt(folder: Path, *, dtype: str | None = None) -> CLT:
    """A circuit-tracer CLT folder (config.yaml optional: its loader needs only the files)."""
    import yaml

    n = sum(1 for _ in folder.glob("W_enc_*.safetensors"))
    raw = (
        (yaml.safe_load((folder / CONFIG).read_text()) or {}) if (folder / CONFIG).is_file() else {}
    )
    ours = read_our_fields(raw, folder / CONFIG)
    arrays: dict[str, torch.Tensor] = {}
    stacks: dict[str, list[torch.Tensor]] = {"W_enc": [], "b_enc": [], "b_dec": [], "threshold": []}
    for i in range(n):
        enc_file, dec_file = folder / f"W_enc_{i}.safetensors", folder / f"W_dec_{i}.safetensors"
        if not dec_file.is_file():
            raise ValueError(f"{folder}: has {n} W_enc files but no {dec_file.name}")
        enc, dec = read_safetensors(enc_file), read_safetensors(dec_file)
        check_names(enc, (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"), enc_file)
        check_names(dec, (f"W_dec_{i}",), dec_file)
        for name in stacks:
            if f"{name}_{i}" in enc:
                t = enc[f"{name}_{i}"]
                stacks[name].append(t.T if name == "W_enc" else t)
            elif name != "threshold":
                raise ValueError(f"{enc_file}: missing array {name}_{i}")
        arrays[f"W_dec_{i}"] = dec[f"W_dec_{i}"]
    if 0 < len(stacks["threshold"]) < n:
        raise ValueError(f"{folder}: some layers have a threshold and some do not")
    arrays.update({k: torch.stack(v) for k, v in stacks.items() if v})
    d, m = arrays["W_enc"].shape[1:]
    fields = {"layer": 0, "site": _IN_HOOKS.get(str(raw.get("feature_input_hook")), "mlp_in"),
              "target_site": _OUT_HOOKS.get(str(raw.get("feature_output_hook")), "mlp_out"),
              **ours}  # fmt: skip
    cfg = SAEConfig(
        architecture="jumprelu" if "threshold" in arrays else "relu", d_in=d, d_sae=m, n_layers=n,
        dtype=dtype or str(arrays["W_enc"].dtype).removeprefix("torch."), **fields,
    )  # fmt: skip
    return CLT.from_arrays(cfg, arrays, source=str(folder)).eval()


def _write(folder: Path, files: dict[str, dict[str, torch.Tensor]], config: dict[str, Any]) -> None:
    import yaml
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        for name, tensors in files.items():
            save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, tmp / name)
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))


def write_transcoder_set(saes: Sequence[SAE], folder: Path, *, scan: str | None = None) -> Path:
    """Write one `mlp_in -> mlp_out` transcoder per layer (0..n-1, any order given) as a folder that
    circuit-tracer loads with the same outputs.

    JumpReLU and relu write as they are and batchtopk as its inference JumpReLU; topk is refused (its
    loader has no k). Input scale and `b_dec` subtraction are folded into a copy.
    """
    by_layer = _check_set(saes, folder)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for layer, sae in by_layer.items():
        s = copy.deepcopy(sae).fold_input_scale().fold_b_dec_into_b_enc()
        tensors = {
            "W_enc": s.W_enc.detach().T,
            "W_dec": s.W_dec.detach(),
            "b_enc": s.b_enc.detach(),
            "b_dec": s.b_dec.detach(),
        }
        if s.cfg.architecture in ("jumprelu", "batchtopk"):
            tensors["activation_function.threshold"] = s.threshold.detach()
        if s.W_skip is not None:
            tensors["W_skip"] = s.W_skip.detach().T
        files[f"layer_{layer}.safetensors"] = tensors
    first = by_layer[0].cfg
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "feature_input_hook": _HOOKS["mlp_in"],
        "feature_output_hook": _HOOKS["mlp_out"],
        "scan": scan or f"gemmascope/{first.model or 'model'}/transcoders",
        "gemmascope": {str(layer): our_fields(sae.cfg) for layer, sae in by_layer.items()},
    }
    _write(folder, files, config)
    return folder


def read_transcoder_set(folder: Path, *, dtype: str | None = None) -> list[SAE]:
    """The transcoders of a circuit-tracer folder, layer 0 first."""
    import yaml

    raw = yaml.safe_load((folder / CONFIG).read_text()) or {}
    if raw.get("model_kind") != "transcoder_set":
        raise ValueError(
            f"{folder / CONFIG}: model_kind {raw.get('model_kind')!r}; gemmascope reads circuit-"
            "tracer's per-layer `transcoder_set` (a cross-layer transcoder is another format)"
        )
    site = _IN_HOOKS.get(str(raw.get("feature_input_hook")))
    target = _OUT_HOOKS.get(str(raw.get("feature_output_hook")))
    layers = sorted(int(m[1]) for p in folder.iterdir() if (m := _LAYER_RE.fullmatch(p.name)))
    if layers != list(range(len(layers))):
        raise ValueError(
            f"{folder}: layer files {layers} are not one per layer from 0; circuit-tracer needs "
            "layer_0.safetensors .. layer_{n-1}.safetensors"
        )
    ours = raw.get("gemmascope") or {}
    saes = []
    for layer in layers:
        file = folder / f"layer_{layer}.safetensors"
        state = read_safetensors(file)
        check_names(state, _ARRAYS, file)
        w_enc = state.get("W_enc")
        if w_enc is None or w_enc.ndim != 2:
            raise ValueError(f"{file}: expected 'W_enc' of shape (d_transcoder, d_model)")
        fields = {
            "layer": layer,
            "site": site,
            "target_site": target,
            "hook_name": site_to_hook(layer, site),
            **{k: v for k, v in (ours.get(str(layer)) or {}).items() if v is not None},
        }
        skip = "W_skip" in state
        try:
            cfg = SAEConfig(
                architecture="jumprelu" if "activation_function.threshold" in state else "relu",
                d_in=w_enc.shape[1],
                d_sae=w_enc.shape[0],
                dtype=dtype or str(w_enc.dtype).removeprefix("torch."),
                skip_connection=skip,
                **fields,
            )
        except ValueError as e:
            raise ValueError(f"{folder / CONFIG}: {e}") from None
        arrays = {"W_enc": w_enc.T, "W_dec": state.get("W_dec"), "b_enc": state.get("b_enc"),
                  "b_dec": state.get("b_dec"), "threshold": state.get("activation_function.threshold"),
                  "W_skip": state["W_skip"].T if skip else None}  # fmt: skip
        arrays = {n: t for n, t in arrays.items() if t is not None}
        saes.append(SAE.from_arrays(cfg, arrays, source=str(file)).eval())
    return saes


def _check_set(saes: Sequence[SAE], folder: Path) -> dict[int, SAE]:
    """The transcoders by layer, after checking they make a set circuit-tracer can load."""
    by_layer: dict[int, SAE] = {}
    for sae in saes:
        c = sae.cfg
        if (c.site, c.target_site) != ("mlp_in", "mlp_out"):
            raise ValueError(
                f"{folder}: {sae!r} is not an MLP transcoder (mlp_in -> mlp_out); circuit-tracer's "
                "transcoder sets replace the MLPs"
            )
        if c.architecture == "topk":
            raise ValueError(
                f"{folder}: {sae!r} is topk, which circuit-tracer's transcoder files cannot hold "
                "(JumpReLU or relu only); train jumprelu or batchtopk transcoders"
            )
        if c.layer in by_layer:
            raise ValueError(f"{folder}: two transcoders for layer {c.layer}; pass one per layer")
        by_layer[int(c.layer)] = sae  # type: ignore[arg-type]
    if sorted(by_layer) != list(range(len(by_layer))) or not by_layer:
        raise ValueError(
            f"{folder}: transcoders for layers {sorted(by_layer)}; circuit-tracer needs one for "
            "every layer from 0"
        )
    widths = {s.cfg.d_sae for s in by_layer.values()}
    skips = {s.cfg.skip_connection for s in by_layer.values()}
    if len(widths) > 1 or len(skips) > 1:
        raise ValueError(
            f"{folder}: the transcoders differ in width {sorted(widths)} or skip connection; "
            "circuit-tracer's sets share both"
        )
    return dict(sorted(by_layer.items()))
