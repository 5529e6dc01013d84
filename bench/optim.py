"""The fused Adam step (`optim.adam_step`) vs the same arithmetic as torch ops, in one process.

One training step's optimiser work for a JumpReLU SAE of width 16,384 on d_in 640: Adam (beta1 0) on
W_enc and W_dec, with W_dec's gradient projected off each row and the rows renormalised. The
reference is the torch-ops code the trainer ran before `optim.py`. Both take turns on fresh random
gradients; prints the median time of each and the ratio.

    python bench/optim.py [--width 16384] [--d-in 640] [--steps 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from gemmascope.train.optim import adam_step


def torch_ops(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor, lr: float, step: int,
              unit_rows: bool) -> None:  # fmt: skip
    """The reference: Adam with beta1 0, written as torch ops."""
    if unit_rows:
        g -= (g * w).sum(1, keepdim=True) * w
    v.mul_(0.999).addcmul_(g, g, value=1 - 0.999)
    w.addcdiv_(g, (v / (1 - 0.999 ** (step + 1))).sqrt_().add_(1e-8), value=-lr)
    if unit_rows:
        w /= w.norm(dim=1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--d-in", type=int, default=640)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d, m = args.d_in, args.width
    # W_enc as the trainer keeps it: the transpose of a row-major (width, d_in) array
    state = {name: (torch.nn.Parameter(torch.randn(m, d).T), torch.nn.Parameter(torch.randn(m, d)))
             for name in ("fused", "torch ops")}  # fmt: skip
    moments = {name: (torch.zeros_like(e), torch.zeros_like(w)) for name, (e, w) in state.items()}
    times: dict[str, list[float]] = {name: [] for name in state}
    for step in range(args.steps):
        g_enc, g_dec = torch.randn(m, d).T, torch.randn(m, d)
        for name, (enc, dec) in state.items():
            v_enc, v_dec = moments[name]
            enc.grad, dec.grad = g_enc.clone(), g_dec.clone()
            start = time.perf_counter()
            if name == "fused":
                adam_step(enc, v_enc, None, lr=1e-3, beta1=0.0, beta2=0.999, step=step)
                adam_step(
                    dec, v_dec, None, lr=1e-3, beta1=0.0, beta2=0.999, step=step, unit_rows=True
                )
            else:
                torch_ops(enc.data, enc.grad, v_enc, 1e-3, step, unit_rows=False)
                torch_ops(dec.data, dec.grad, v_dec, 1e-3, step, unit_rows=True)
            times[name].append(time.perf_counter() - start)
    med = {name: sorted(t[1:])[len(t[1:]) // 2] for name, t in times.items()}  # the first compiles
    print(f"width {m:,}, d_in {d}, {args.steps} steps, {torch.get_num_threads()} threads")
    for name, t in med.items():
        print(f"{name:<10} {t * 1e3:8.1f} ms per step")
    print(f"fused / torch ops speed-up: {med['torch ops'] / med['fused']:.2f}x")


if __name__ == "__main__":
    main()
