"""The cross-layer transcoder: one encoder per layer, each layer's latents writing to its own MLP
output and every later one's, as Gemma Scope 2's and circuit-tracer's CLTs do.

Layer `l` reads `x_l` (its `site`, `mlp_in`) and writes
`y_l = sum over i <= l of z_i @ W_dec[i][:, l - i] + b_dec[l]` (`+ x_l @ W_skip[l]`)
with `z_i = activate(x_i @ W_enc[i] + b_enc[i])`. A latent of layer `i` thus has `n_layers - i`
decoder rows, one per layer it writes. Parameters keep Gemma Scope's orientation (`W_enc [d, F]`,
decoder rows `[F, d]`), stacked over layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gemmascope.sae import SAE, SAEConfig, activate, dtype_of


class CLT(nn.Module):
    """A cross-layer transcoder over `cfg.n_layers` consecutive layers from `cfg.layer` on.

    Inputs and outputs carry a layer dimension before the last: `[..., n_layers, d]`.
    """

    def __init__(self, cfg: SAEConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        if cfg.n_layers is None:
            raise ValueError("a CLT's config needs `n_layers`; for one layer build an `SAE`")
        self.cfg = cfg
        dt, L, d, m = dtype_of(cfg.dtype), cfg.n_layers, cfg.d_in, cfg.d_sae

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dt, device=device))

        self.W_enc, self.b_enc, self.threshold = zeros(L, d, m), zeros(L, m), zeros(L, m)
        self.W_dec = nn.ParameterList([zeros(m, L - i, d) for i in range(L)])
        self.b_dec = zeros(L, d)
        self.W_skip = zeros(L, d, d) if cfg.skip_connection else None

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers  # type: ignore[return-value]

    @property
    def layers(self) -> range:
        """The model's layer numbers this CLT reads and writes."""
        return range(self.cfg.layer, self.cfg.layer + self.n_layers)  # type: ignore[operator]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def _check(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.n_layers, self.cfg.d_in):
            raise ValueError(
                f"input ends in shape {tuple(x.shape[-2:])}; this CLT reads [..., n_layers="
                f"{self.n_layers}, d_in={self.cfg.d_in}]: layers {self.layers.start}.."
                f"{self.layers.stop - 1} of {self.cfg.site}, stacked before the last dimension"
            )
        return x.to(dtype=self.dtype, device=self.W_enc.device)

    def encode_layer(self, x: Tensor, i: int) -> Tensor:
        """Latents `[..., d_sae]` of the CLT's `i`-th layer from that layer's input `[..., d]`."""
        pre = x.to(self.dtype) @ self.W_enc[i] + self.b_enc[i]
        return activate(pre, self.cfg, self.threshold[i], self.training)

    def encode(self, x: Tensor) -> Tensor:
        """Latents `[..., n_layers, d_sae]` for inputs `[..., n_layers, d]`."""
        x = self._check(x)
        return torch.stack([self.encode_layer(x[..., i, :], i) for i in range(self.n_layers)], -2)

    def decode(self, z: Tensor) -> Tensor:
        """What the latents `[..., n_layers, d_sae]` write to every layer: `[..., n_layers, d]`."""
        out = self.b_dec.expand(*z.shape[:-1], self.cfg.d_in).clone()
        for i, w in enumerate(self.W_dec):  # w: (m, L - i, d)
            out[..., i:, :] += torch.einsum("...m,mld->...ld", z[..., i, :].to(self.dtype), w)
        return out

    def skip(self, x: Tensor) -> Tensor:
        """The skip connections' part of the output, `x_l @ W_skip[l]` per layer."""
        x = self._check(x)
        if self.W_skip is None:
            return torch.zeros_like(x)
        return torch.einsum("...ld,lde->...le", x, self.W_skip)

    def forward(self, x: Tensor) -> Tensor:
        """The prediction of every layer's `target_site` from every layer's `site`."""
        out = self.decode(self.encode(x))
        return out if self.W_skip is None else out + self.skip(x)

    def state_arrays(self) -> dict[str, Tensor]:
        """The weights by name: `W_enc [L, d, F]`, `b_enc`, `threshold [L, F]`, `b_dec [L, d]`,
        `W_dec_{i} [F, L - i, d]` and `W_skip [L, d, d]` for an affine CLT."""
        arrays = {n: getattr(self, n).detach() for n in ("W_enc", "b_enc", "threshold", "b_dec")}
        arrays.update({f"W_dec_{i}": w.detach() for i, w in enumerate(self.W_dec)})
        if self.W_skip is not None:
            arrays["W_skip"] = self.W_skip.detach()
        return arrays

    @classmethod
    def from_arrays(
        cls, cfg: SAEConfig, arrays: dict[str, Any], *, source: str = "arrays",
        allow_nonfinite: bool = False,
    ) -> CLT:  # fmt: skip
        """Build a CLT from `state_arrays`' names, checking each one's presence, shape and values."""
        clt = cls(cfg)
        L, d, m = clt.n_layers, cfg.d_in, cfg.d_sae
        expected = {"W_enc": (L, d, m), "b_enc": (L, m), "threshold": (L, m), "b_dec": (L, d),
                    **{f"W_dec_{i}": (m, L - i, d) for i in range(L)},
                    **({"W_skip": (L, d, d)} if cfg.skip_connection else {})}  # fmt: skip
        extra = sorted(set(arrays) - set(expected))
        if extra:
            raise ValueError(f"{source}: unexpected arrays {extra}; a CLT has {sorted(expected)}")
        for name, shape in expected.items():
            if name not in arrays:
                if name == "threshold" and cfg.architecture != "jumprelu":
                    continue
                raise ValueError(f"{source}: missing array {name!r} of a {L}-layer CLT")
            t = torch.as_tensor(arrays[name])
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{source}: array {name!r} has shape {tuple(t.shape)}, expected {shape} "
                    f"(n_layers={L}, d_in={d}, d_sae={m})"
                )
            if not allow_nonfinite and t.is_floating_point() and not bool(t.isfinite().all()):
                raise ValueError(
                    f"{source}: array {name!r} holds NaN or inf, so the CLT would compute NaNs; "
                    "it was saved broken. To open it anyway, load(..., allow_nonfinite=True)"
                )
            target = clt.W_dec[int(name[6:])] if name.startswith("W_dec_") else getattr(clt, name)
            with torch.no_grad():
                target.copy_(t.to(clt.dtype))
        return clt

    def layer_transcoder(self, i: int) -> SAE:
        """The `i`-th layer's encoder as a one-layer transcoder whose decoder is that layer's own
        rows only (so it encodes exactly as the CLT does; it reconstructs only part of the output)."""
        c = self.cfg
        cfg = SAEConfig(**{**c.to_dict(), "n_layers": None, "layer": c.layer + i,  # type: ignore[operator]
                           "extra": {**c.extra, "clt_layer": i}})  # fmt: skip
        arrays = {"W_enc": self.W_enc[i], "W_dec": self.W_dec[i][:, 0], "b_enc": self.b_enc[i],
                  "b_dec": self.b_dec[i], "threshold": self.threshold[i],
                  **({"W_skip": self.W_skip[i]} if self.W_skip is not None else {})}  # fmt: skip
        return SAE.from_arrays(cfg, {k: v.detach() for k, v in arrays.items()}).eval()

    def __repr__(self) -> str:
        c = self.cfg
        skip = ", skip" if c.skip_connection else ""
        return (
            f"CLT({c.architecture}, layers {self.layers.start}-{self.layers.stop - 1}, "
            f"{c.site}->{c.target_site}{skip}, d_in={c.d_in}, d_sae={c.d_sae} per layer, "
            f"dtype={c.dtype}, model={c.model!r})"
        )
