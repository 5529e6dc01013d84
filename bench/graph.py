"""Attribution graphs: ours against circuit-tracer 0.5.0 (nnsight backend) on the same model, prompt
and transcoders, side by side in one run; each side in a process of its own, which reports its
attribution time and peak memory (resident set size). Prints both and their ratio.

Gemma 3 270M, a prompt of about 16 tokens, 18 MLP transcoders: a trained run's (`--transcoders`, any
folder `io.load_transcoders` reads) or, by default, random ones of `--width` latents whose
thresholds give about `--l0` active latents per token on the prompt (speed depends on the count of
active latents, not on what they mean). circuit-tracer runs in the venv `tests/toolenv.py` builds.

    python bench/graph.py                                # random 4k transcoders, L0 ~50
    python bench/graph.py --transcoders runs/transcoders --pick w4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "The capital of the state containing Dallas is Austin, and the capital of Texas is"

THEIRS = """
import sys, glob, os, json, time, resource, torch, yaml
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
folder, tset, ids, batch = sys.argv[1:]
cfg = yaml.safe_load(open(os.path.join(tset, "config.yaml")))
paths = {int(p.rsplit("_", 1)[1].split(".")[0]): p for p in glob.glob(f"{tset}/layer_*.safetensors")}
tcs = load_transcoder_set(paths, scan=cfg["scan"], feature_input_hook=cfg["feature_input_hook"],
    feature_output_hook=cfg["feature_output_hook"], device=torch.device("cpu"), dtype=torch.float32,
    lazy_encoder=False, lazy_decoder=False)
model = ReplacementModel.from_pretrained_and_transcoders(folder, tcs, backend="nnsight",
    device=torch.device("cpu"), dtype=torch.float32)
start = time.perf_counter()
g = attribute(torch.load(ids), model, batch_size=int(batch))
print(json.dumps({"seconds": time.perf_counter() - start, "features": int(len(g.selected_features)),
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def ours(tset: Path, ids: Path, batch: int) -> None:
    """Worker: our attribution of the same ids through the same set, reported as JSON."""
    from gemmascope import io
    from gemmascope.circuits import attribute
    from gemmascope.models import load_model

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model, tokenizer = load_model()
    tcs = io.load_transcoders(tset)
    start = time.perf_counter()
    g = attribute(model, tokenizer, torch.load(ids), tcs, batch_size=batch, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "features": g.n_features, **g.scores(),
                      "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))  # fmt: skip


def random_set(model, ids: torch.Tensor, width: int, l0: float) -> list:
    """One random JumpReLU transcoder per layer, thresholds set so that about `l0` latents are
    active per token of the prompt."""
    from gemmascope.hooks import collect, decoder_layers
    from gemmascope.sae import SAE, SAEConfig

    layers = len(decoder_layers(model))
    acts = collect(model, ids[None], [(layer, "mlp_in") for layer in range(layers)])
    g = torch.Generator().manual_seed(0)
    out = []
    for layer in range(layers):
        x = acts[layer, "mlp_in"][0, 1:]  # (T - 1, d) without the BOS
        w = torch.randn(x.shape[1], width, generator=g)
        w /= w.norm(dim=0)
        theta = float((x @ w).flatten().quantile(1 - l0 / width))
        cfg = SAEConfig("jumprelu", d_in=x.shape[1], d_sae=width, layer=layer, site="mlp_in",
                        target_site="mlp_out")  # fmt: skip
        out.append(SAE.from_arrays(cfg, {"W_enc": w, "W_dec": w.T * 0.1, "b_enc": torch.zeros(width),
                                         "b_dec": torch.zeros(x.shape[1]),
                                         "threshold": torch.full((width,), theta)}))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--transcoders", type=Path, help="a folder of trained MLP transcoders")
    ap.add_argument("--pick", help="text the transcoders' ids contain")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=50.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return ours(*args.worker, args.batch_size)
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from toolenv import circuit_tracer_python, for_transformers_4

    from gemmascope import io
    from gemmascope.models import _embedded_folder, load_model

    model, tokenizer = load_model()
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"][0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tcs = (io.load_transcoders(args.transcoders, args.pick) if args.transcoders
               else random_set(model, ids, args.width, args.l0))  # fmt: skip
        io.save_transcoders(tcs, tmp / "set")
        torch.save(ids, tmp / "ids.pt")
        folder = tmp / "model"  # the embedded model, as transformers 4.57 reads it
        folder.mkdir()
        for f in _embedded_folder().iterdir():  # the weights linked, the small files copied
            if f.suffix == ".safetensors":
                (folder / f.name).symlink_to(f)
            else:
                (folder / f.name).write_bytes(f.read_bytes())
        for_transformers_4(folder)
        del model
        runs = {}
        cmd = {"gemmascope": [sys.executable, __file__, "--worker", tmp / "set", tmp / "ids.pt",
                              "--batch-size", str(args.batch_size)],
               "circuit-tracer": [circuit_tracer_python(), "-c", THEIRS, folder, tmp / "set",
                                  tmp / "ids.pt", str(args.batch_size)]}  # fmt: skip
        for name, argv in cmd.items():
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    width = tcs[0].cfg.d_sae
    print(f"prompt: {len(ids)} tokens; {len(tcs)} transcoders of {width:,} latents; "
          f"{runs['gemmascope']['features']:,} active latents (circuit-tracer: "
          f"{runs['circuit-tracer']['features']:,}); batch {args.batch_size}; {torch.get_num_threads()} threads")  # fmt: skip
    for name, r in runs.items():
        print(f"{name:>15}: {r['seconds']:7.1f} s  peak {r['peak_gib']:5.2f} GiB")
    a, b = runs["gemmascope"], runs["circuit-tracer"]
    print(
        f"{'ratio':>15}: {b['seconds'] / a['seconds']:7.1f}x faster, "
        f"{b['peak_gib'] / a['peak_gib']:.1f}x less memory"
    )
    print(f"replacement score {a['replacement']:.3f}, completeness {a['completeness']:.3f}")


if __name__ == "__main__":
    main()
