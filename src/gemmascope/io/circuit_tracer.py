"""circuit-tracer's transcoder sets: one folder with `config.yaml` and `layer_{i}.safetensors` for
every layer 0..n-1, as its `TranscoderSet.to_safetensors` and its transcoder cache write them.

Each layer file holds `W_enc [F, d]` (our `W_enc` transposed), `W_dec [F, d]`, `b_enc`, `b_dec`,
`activation_function.threshold` for JumpReLU (relu without it) and, for skip transcoders,
`W_skip [d, d]` applied as `x @ W_skip.T` (our `W_skip` transposed). `config.yaml` names
`model_kind: transcoder_set` and the TransformerLens hooks read and written: `mlp.hook_in` (our
`mlp_in`) and `hook_mlp_out` (our `mlp_out`). Our own fields ride along under a `gemmascope` key,
which circuit-tracer ignores.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gemmascope.common.files import atomic_dir
from gemmascope.io._common import check_names, our_fields, read_safetensors, site_to_hook
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
        files[f"layer_{layer}.safetensors"] = {n: t.cpu().contiguous() for n, t in tensors.items()}
    first = by_layer[0].cfg
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "feature_input_hook": _HOOKS["mlp_in"],
        "feature_output_hook": _HOOKS["mlp_out"],
        "scan": scan or f"gemmascope/{first.model or 'model'}/transcoders",
        "gemmascope": {str(layer): our_fields(sae.cfg) for layer, sae in by_layer.items()},
    }
    import yaml
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        for name, tensors in files.items():
            save_file(tensors, tmp / name)
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
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
