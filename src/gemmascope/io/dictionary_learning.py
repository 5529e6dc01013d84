"""dictionary_learning (saprmarks) folders: `ae.pt` (a state dict saved with `torch.save`) and the
`config.json` that `trainSAE` writes beside it, `{"trainer": {"dict_class": ..., ...}, ...}`.

`ae.pt` is read with `torch.load(weights_only=True)`: tensors only, never a full unpickle.
Mapping (their class -> ours), exact in encodings:
- `AutoEncoder` (standard, p-anneal trainers): `relu(encoder(x - bias))` -> relu, b_dec subtracted.
  Their `load_dictionary` rescales decoder columns to unit norm, so we write only unit-norm decoders.
- `AutoEncoderNew` (April-update trainer): `relu(encoder(x))`, decoder bias -> relu.
- `AutoEncoderTopK` -> topk; `BatchTopKSAE` -> batchtopk whose inference threshold is the one scalar
  `threshold` for every latent (-1, never estimated, means relu; clamped at 0 like SAELens').
- `JumpReluAutoEncoder`: `relu(pre * (pre > threshold))` -> jumprelu with thresholds clamped at 0.
- `GatedAutoEncoder`: `1[W x' + gate_bias > 0] * relu(exp(r_mag) W x' + mag_bias)` with
  `x' = x - decoder_bias` is exactly a JumpReLU on `pre = exp(r_mag) W x' + mag_bias` with threshold
  `max(mag_bias - exp(r_mag) gate_bias, 0)`; read as jumprelu (and written back as a JumpReLU).

What `ae.pt` holds that our SAE does not is kept in `extra["dictionary_learning"]["ae.pt"]`, so that
writing back reproduces it: AutoEncoderTopK's `threshold` (the inference threshold it estimated, used
only by `encode(use_threshold=True)`), BatchTopKSAE's (-1 where never estimated) and a JumpReLU's
negative thresholds (`{latent: value}`); the last two act as 0 does, so they return only where ours is 0.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import torch

from gemmascope.common.files import atomic_dir, read_json, write_json
from gemmascope.io._common import our_fields, read_our_fields
from gemmascope.sae import SAE, SAEConfig

_KEYS: dict[str, set[str]] = {
    "AutoEncoder": {"bias", "encoder.weight", "encoder.bias", "decoder.weight"},
    "AutoEncoderNew": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "AutoEncoderTopK": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "BatchTopKSAE": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "GatedAutoEncoder": {
        "decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias", "decoder.weight",
    },
}  # fmt: skip
"""State-dict keys of each dictionary class we read, as their `state_dict()` names them."""
_TRAINERS = {
    "relu": ("StandardTrainer", "AutoEncoder"),
    "jumprelu": ("JumpReluTrainer", "JumpReluAutoEncoder"),
    "topk": ("TopKTrainer", "AutoEncoderTopK"),
    "batchtopk": ("BatchTopKTrainer", "BatchTopKSAE"),
}


def _load_state(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and containers
        raise ValueError(
            f"{file}: holds Python objects beyond tensors, which only a full unpickle could read; "
            f"refusing to unpickle ({str(e).splitlines()[0]}). Save the state dict alone "
            "(`torch.save(ae.state_dict(), ...)`)"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"{file}: expected a torch state dict, could not read it ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(
            f"{file}: expected a dict of tensors (a state_dict), found {type(state).__name__}"
        )
    return state


def _dict_class(state: dict[str, torch.Tensor], trainer: dict[str, Any], file: Path) -> str:
    """The dictionary class: config.json's `dict_class`, checked against the keys of `ae.pt`."""
    named = trainer.get("dict_class")
    keys = set(state)
    if named == "AutoEncoder" and keys == _KEYS["AutoEncoderNew"]:
        named = "AutoEncoderNew"  # the April-update trainer names the class it was given
    if named is None:
        fits = [name for name, ks in _KEYS.items() if ks == keys]
        if len(fits) == 1:
            return fits[0]
        raise ValueError(
            f"{file.parent / 'config.json'}: needs trainer.dict_class to tell {fits or 'the class'} apart "
            f"(ae.pt keys {sorted(keys)})"
        )
    if named not in _KEYS:
        raise ValueError(
            f"{file.parent / 'config.json'}: dict_class {named!r} is not supported; expected one of "
            f"{sorted(_KEYS)}"
        )
    if keys != _KEYS[named]:
        raise ValueError(
            f"{file}: a {named} has arrays {sorted(_KEYS[named])}; found {sorted(keys)}"
        )
    return named


def _to_ours(
    cls: str, s: dict[str, torch.Tensor]
) -> tuple[str, dict[str, torch.Tensor], bool, int | None]:
    """(architecture, our arrays, apply_b_dec_to_input, k) for a state dict of class `cls`."""
    if cls == "JumpReluAutoEncoder":
        arrays = {n: s[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        return "jumprelu", {**arrays, "threshold": s["threshold"].clamp(min=0)}, False, None
    if cls == "GatedAutoEncoder":
        scale = s["r_mag"].exp()  # (d_sae,)
        arrays = {
            "W_enc": s["encoder.weight"].T * scale,
            "b_enc": s["mag_bias"],
            "W_dec": s["decoder.weight"].T,
            "b_dec": s["decoder_bias"],
            "threshold": (s["mag_bias"] - scale * s["gate_bias"]).clamp(min=0),
        }
        return "jumprelu", arrays, True, None
    arrays = {
        "W_enc": s["encoder.weight"].T,
        "b_enc": s["encoder.bias"],
        "W_dec": s["decoder.weight"].T,
    }
    if cls == "AutoEncoder":
        return "relu", {**arrays, "b_dec": s["bias"]}, True, None
    if cls == "AutoEncoderNew":
        return "relu", {**arrays, "b_dec": s["decoder.bias"]}, False, None
    arrays["b_dec"] = s["b_dec"]
    k = int(s["k"])
    if cls == "AutoEncoderTopK":
        return "topk", arrays, True, k
    d_sae = arrays["b_enc"].shape[0]
    arrays["threshold"] = torch.full((d_sae,), max(float(s["threshold"]), 0.0))
    return "batchtopk", arrays, True, k


def _kept(cls: str, s: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What `ae.pt` holds beyond our arrays (see the module doc), for the writer to reproduce."""
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {"threshold": float(s["threshold"])}
    if cls == "JumpReluAutoEncoder":
        below = (s["threshold"] < 0).nonzero().flatten().tolist()
        return (
            {"threshold_below_0": {str(i): float(s["threshold"][i]) for i in below}}
            if below
            else {}
        )
    return {}


def read_dictionary_learning(
    folder: Path,
    *,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> SAE:
    """Load a dictionary_learning `ae.pt` (+ `config.json`) with encodings equal to theirs."""
    file, cfg_file = folder / "ae.pt", folder / "config.json"
    raw = read_json(cfg_file) if cfg_file.is_file() else {}
    trainer = raw.get("trainer") or {}
    state = _load_state(file)
    cls = _dict_class(state, trainer, file)
    arch, arrays, apply_b_dec, k = _to_ours(cls, state)
    d_in, d_sae = arrays["W_enc"].shape
    fields = {"model": trainer.get("lm_name"), "layer": trainer.get("layer")}
    fields = {key: v for key, v in fields.items() if v is not None}
    fields.update(read_our_fields(raw, cfg_file))
    extra = dict(fields.pop("extra", {}))
    extra["dictionary_learning"] = {key: v for key, v in raw.items() if key != "gemmascope"}
    if kept := _kept(cls, state):
        extra["dictionary_learning"]["ae.pt"] = kept
    try:
        cfg = SAEConfig(
            architecture=arch,  # type: ignore[arg-type]
            d_in=d_in,
            d_sae=d_sae,
            k=k,
            dtype=dtype or str(arrays["W_enc"].dtype).removeprefix("torch."),
            apply_b_dec_to_input=apply_b_dec,
            extra=extra,
            **fields,
        )
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    return SAE.from_arrays(cfg, arrays, source=str(file), allow_nonfinite=allow_nonfinite)


def _their_state(s: SAE, folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of their class for our (input-scale-folded) SAE `s`, or a clear refusal."""
    c, p = s.cfg, {n: t.detach().cpu() for n, t in s.state_arrays().items()}
    kept = (c.extra.get("dictionary_learning") or {}).get("ae.pt") or {}
    if c.architecture == "jumprelu":
        s.fold_b_dec_into_b_enc()  # JumpReluAutoEncoder loads with apply_b_dec_to_input False
        p = {n: t.detach().cpu() for n, t in s.state_arrays().items()}
        if (p["threshold"] < 0).any():
            raise ValueError(
                f"{folder}: this SAE has negative thresholds, where it outputs negative activations; "
                "dictionary_learning's JumpReLU outputs relu(pre) and would differ. Clamp them "
                "(`sae.threshold.data.clamp_(min=0)`) if that is acceptable, or save as 'gemmascope'"
            )
        threshold = p["threshold"].clone()
        for i, v in (kept.get("threshold_below_0") or {}).items():
            if int(i) < c.d_sae and threshold[int(i)] == 0:  # relu: a threshold <= 0 acts as 0
                threshold[int(i)] = v
        return {**p, "threshold": threshold}
    # The other classes subtract b_dec from the input: move our b_enc to match if we do not.
    b_enc = p["b_enc"] if c.apply_b_dec_to_input else p["b_enc"] + p["b_dec"] @ p["W_enc"]
    linear = {"encoder.weight": p["W_enc"].T, "encoder.bias": b_enc, "decoder.weight": p["W_dec"].T}
    if c.architecture == "relu":
        norms = p["W_dec"].norm(dim=-1)  # (d_sae,)
        if not torch.allclose(norms, torch.ones_like(norms), rtol=1e-4, atol=1e-5):
            raise ValueError(
                f"{folder}: dictionary_learning's `load_dictionary` rescales an AutoEncoder's decoder "
                f"columns to unit norm, which would rescale every latent; this SAE's decoder rows "
                f"have norms {norms.min():.4g}..{norms.max():.4g} (input_scale folded in). Fold the "
                "norms into the encoder first (W_enc *= n, b_enc *= n, W_dec /= n[:, None]) or save "
                "as 'saelens' or 'gemmascope'"
            )
        return {"bias": p["b_dec"], **linear}
    theirs = {**linear, "b_dec": p["b_dec"], "k": torch.tensor(c.k, dtype=torch.int32)}
    if c.architecture == "topk":  # -1: no inference threshold estimated
        return {
            **theirs,
            "threshold": torch.tensor(float(kept.get("threshold", -1.0)), dtype=torch.float32),
        }
    t = p["threshold"].float()
    if not torch.equal(t, t[:1].expand_as(t)) or t[0] < 0:
        raise ValueError(
            f"{folder}: dictionary_learning's BatchTopKSAE keeps one non-negative threshold for all "
            f"latents; this SAE has per-latent thresholds {t.min():.4g}..{t.max():.4g}, so its "
            "encodings would change. Save it as 'saelens', 'npz' or 'gemmascope'"
        )
    read = kept.get("threshold")  # their -1 (never estimated) reads as 0: relu outputs are >= 0
    if read is not None and max(read, 0.0) == float(t[0]):
        return {**theirs, "threshold": torch.tensor(float(read), dtype=torch.float32)}
    return {**theirs, "threshold": t[0].clone()}


def write_dictionary_learning(sae: SAE, folder: Path) -> Path:
    """Write `sae` as `ae.pt` + `config.json` that dictionary_learning's `load_dictionary` loads
    with the same encodings (its classes read raw activations: input_scale is folded in)."""
    s = copy.deepcopy(sae).fold_input_scale()
    state = {n: t.contiguous() for n, t in _their_state(s, folder).items()}
    c = sae.cfg
    trainer_class, dict_class = _TRAINERS[c.architecture]
    carried = (c.extra.get("dictionary_learning") or {}).get("trainer") or {}
    trainer = {
        **{key: v for key, v in carried.items() if key not in ("k", "activation_dim", "dict_size")},
        "trainer_class": trainer_class,
        "dict_class": dict_class,
        "activation_dim": c.d_in,
        "dict_size": c.d_sae,
        "layer": c.layer,
        "lm_name": c.model,
    }
    if c.k is not None:
        trainer["k"] = c.k
    fields = our_fields(c)
    fields["extra"] = {key: v for key, v in c.extra.items() if key != "dictionary_learning"}
    config: dict[str, Any] = {"trainer": trainer, "gemmascope": fields}
    with atomic_dir(folder) as tmp:
        torch.save(state, tmp / "ae.pt")
        write_json(tmp / "config.json", config)
    return folder
