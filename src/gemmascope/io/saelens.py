"""SAELens 6.x folders: `cfg.json` + `sae_weights.safetensors`, as `SAE.save_model` writes them.

Mapping (SAELens -> ours), exact in encodings:
- `standard` -> relu; `topk` -> topk; `jumprelu` -> jumprelu.
- SAELens' JumpReLU is `relu(pre) * (pre > t)`, ours `pre * (pre > t)`; they agree for every input
  once `t` is clamped at 0, so thresholds are clamped on load and negative ones refused on save.
- BatchTopK has no inference class in SAELens: `save_inference_model` writes it as `jumprelu` with
  `metadata.training_architecture = "batchtopk"`; we read that back as batchtopk (eval mode is that
  JumpReLU) and write batchtopk the same way. A training checkpoint (`architecture: batchtopk`,
  scalar `topk_threshold`) is converted the way `save_inference_model` would.
- `rescale_acts_by_decoder_norm` (topk, batchtopk) is folded into the weights, as SAELens does.
- `normalize_activations`: `expected_average_only_in` becomes `input_scale = 1/scaling_factor` when
  the folder has the trainer's `activation_scaler.json`; per-token schemes (`layer_norm`,
  `constant_norm_rescale`) and un-folded `covariance_whitening` are refused.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from gemmascope.common.files import atomic_dir, read_json, write_json
from gemmascope.io._common import (
    check_names,
    hook_to_site,
    read_safetensors,
    site_to_hook,
)
from gemmascope.sae import SAE, Architecture, SAEConfig

WRITTEN_VERSION = "6.0.0"
"""`metadata.sae_lens_version` we write: below 6, SAELens would run its pre-6 translation."""
_ARCHS: dict[str, Architecture] = {
    "standard": "relu",
    "jumprelu": "jumprelu",
    "topk": "topk",
    "batchtopk": "batchtopk",
}
_WEIGHTS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_MAPPED_META = {
    "model_name",
    "hook_name",
    "context_size",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
    "gemmascope",
}


def _major(version: str) -> int:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else 0


def _whole(v: Any) -> bool:
    return isinstance(v, (int, float)) and float(v).is_integer() and v > 0


def _input_scale(raw: dict[str, Any], folder: Path, cfg_file: Path) -> float:
    norm = raw.get("normalize_activations") or "none"
    if norm == "none":
        return 1.0
    if norm == "expected_average_only_in":
        scaler = folder / "activation_scaler.json"
        sf = read_json(scaler).get("scaling_factor") if scaler.is_file() else None
        if isinstance(sf, (int, float)) and sf > 0:
            return 1.0 / sf  # SAELens multiplies inputs by sf; we divide by input_scale
        raise ValueError(
            f"{cfg_file}: normalize_activations='expected_average_only_in' but the folder has no "
            f'{scaler.name} with a positive "scaling_factor", so the scale the SAE expects is '
            "unknown. Load the final SAE (SAELens folds the scale in at the end of training) or fold "
            "it with SAELens' `fold_activation_norm_scaling_factor` and save again"
        )
    fix = (
        "fold it with SAELens' `fold_activation_whitening` and save again"
        if norm == "covariance_whitening"
        else "use this SAE in SAELens"
    )
    raise ValueError(
        f"{cfg_file}: normalize_activations={norm!r} cannot be represented here: gemmascope SAEs read "
        f"activations divided by one fixed scale; {fix}"
    )


def _to_ours(
    raw: dict[str, Any], state: dict[str, torch.Tensor], weights: Path
) -> tuple[Architecture, int | None]:
    """Convert SAELens weights in place to our form; return our architecture and k."""
    arch, meta = raw["architecture"], raw.get("metadata") or {}
    if "log_threshold" in state:  # older JumpReLU checkpoints
        state["threshold"] = state.pop("log_threshold").exp()
    if arch == "batchtopk":  # training checkpoint: one scalar threshold for all latents
        if "topk_threshold" not in state:
            raise ValueError(
                f"{weights}: a batchtopk checkpoint needs 'topk_threshold'; found {sorted(state)}"
            )
        state["threshold"] = torch.full((int(raw["d_sae"]),), float(state.pop("topk_threshold")))
    check_names(state, _WEIGHTS, weights)
    if arch in ("topk", "batchtopk") and raw.get("rescale_acts_by_decoder_norm", False):
        missing = {"W_enc", "W_dec", "b_enc"} - set(state)
        if missing:
            raise ValueError(
                f"{weights}: missing arrays {sorted(missing)}; expected {list(_WEIGHTS)}"
            )
        norms = state["W_dec"].norm(dim=-1).clamp(min=1e-8)  # (d_sae,)
        state["W_enc"] = state["W_enc"] * norms
        state["b_enc"] = state["b_enc"] * norms
        state["W_dec"] = state["W_dec"] / norms[:, None]
    if "threshold" in state:
        state["threshold"] = state["threshold"].clamp(min=0)
    ours, k = _ARCHS[arch], raw.get("k")
    trained_k = (meta.get("training_architecture_details") or {}).get("k")
    if (
        arch == "jumprelu"
        and meta.get("training_architecture") == "batchtopk"
        and _whole(trained_k)
    ):
        ours, k = "batchtopk", trained_k  # SAELens' inference form of BatchTopK
    if ours in ("relu", "jumprelu"):
        return ours, None
    if not _whole(k):
        raise ValueError(
            f"{weights.parent / 'cfg.json'}: {arch} needs a whole number `k`, got {k!r}"
        )
    return ours, int(k)


def read_saelens(
    folder: Path,
    *,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> SAE:
    """Load a SAELens 6.x SAE folder into our SAE, with encodings equal to SAELens' `encode`."""
    cfg_file, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
    raw = read_json(cfg_file)
    meta = raw.get("metadata") or {}
    version = str(meta.get("sae_lens_version") or raw.get("sae_lens_version") or "")
    if _major(version) < 6:
        raise ValueError(
            f"{cfg_file}: written by SAELens {version or '< 6'}; expected a SAELens 6.x cfg.json. "
            "Load it with SAELens 6 (`SAE.load_from_disk`) and `save_model` it again"
        )
    arch = raw.get("architecture")
    if arch not in _ARCHS:
        raise ValueError(
            f"{cfg_file}: architecture {arch!r} is not supported; expected one of {sorted(_ARCHS)}"
        )
    missing = [k for k in ("d_in", "d_sae") if not isinstance(raw.get(k), int)]
    if missing:
        raise ValueError(f"{cfg_file}: expected integer fields {missing}")
    state = read_safetensors(weights)
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in state and not torch.all(state.pop(name) == 1):
            raise ValueError(
                f"{weights}: a {name!r} other than 1 is not supported; fold it into W_dec first"
            )
    input_scale = _input_scale(raw, folder, cfg_file)
    ours, k = _to_ours(raw, state, weights)
    gs = meta.get("gemmascope") or {}
    layer, site = (gs.get("layer"), gs.get("site")) if gs else hook_to_site(meta.get("hook_name"))
    extra = dict(gs.get("extra") or {})
    carried = {key: v for key, v in meta.items() if key not in _MAPPED_META}
    if carried:
        extra["saelens"] = carried
    try:
        cfg = SAEConfig(
            architecture=ours,
            d_in=raw["d_in"],
            d_sae=raw["d_sae"],
            k=k,
            dtype=dtype or str(raw.get("dtype", "float32")).removeprefix("torch."),
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
            input_scale=input_scale,
            model=meta.get("model_name"),
            layer=layer,
            site=site,
            hook_name=meta.get("hook_name"),
            dataset=meta.get("dataset_path"),
            context_size=meta.get("context_size"),
            tokens_trained=gs.get("tokens_trained"),
            extra=extra,
        )
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    return SAE.from_arrays(cfg, state, source=str(weights), allow_nonfinite=allow_nonfinite)


def write_saelens(sae: SAE, folder: Path) -> Path:
    """Write `sae` as a folder that SAELens 6.x `SAE.load_from_disk` loads with the same encodings.

    SAELens ignores `normalize_activations` when loading from disk, so `input_scale` is folded into
    the weights of a copy. Our own fields without a SAELens home go under `metadata.gemmascope`.
    """
    s = copy.deepcopy(sae).fold_input_scale()
    c = s.cfg
    tensors = {n: t.detach().cpu().contiguous() for n, t in s.state_arrays().items()}
    arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk", "batchtopk": "jumprelu"}[
        c.architecture
    ]
    if arch != "jumprelu":
        del tensors["threshold"]
    elif (tensors["threshold"] < 0).any():
        raise ValueError(
            f"{folder}: this SAE has negative thresholds, where it outputs negative activations; "
            "SAELens' JumpReLU outputs relu(pre) and would differ. Clamp them "
            "(`sae.threshold.data.clamp_(min=0)`) if that change is acceptable, or save as 'gemmascope'"
        )
    hook = c.hook_name or site_to_hook(c.layer, c.site)
    extra = {key: v for key, v in c.extra.items() if key != "saelens"}
    meta: dict[str, Any] = {
        **c.extra.get("saelens", {}),
        "sae_lens_version": WRITTEN_VERSION,
        "model_name": c.model,
        "hook_name": hook,
        "context_size": c.context_size,
        "dataset_path": c.dataset,
        "gemmascope": {
            "layer": c.layer,
            "site": c.site,
            "tokens_trained": c.tokens_trained,
            "extra": extra,
        },
    }
    if c.architecture == "batchtopk":
        meta.update(training_architecture="batchtopk", training_architecture_details={"k": c.k})
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": c.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",
        # SAELens reshapes hook_z inputs (..., n_heads, d_head) itself, as it does for Gemma Scope att.
        "reshape_activations": "hook_z" if hook and hook.endswith("hook_z") else "none",
        "metadata": meta,
    }
    if arch == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        save_file(tensors, tmp / "sae_weights.safetensors")
        write_json(tmp / "cfg.json", cfg)
    return folder
