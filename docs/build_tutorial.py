"""Write docs/tutorial.ipynb from the cells below: edit here, run `python docs/build_tutorial.py`.

The notebook is committed without outputs; `tests/test_docs.py` checks that it matches this file and
runs it from top to bottom.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).with_name("tutorial.ipynb")

CELLS: list[tuple[str, str]] = [
    (
        "markdown",
        """\
# Your first feature in ten minutes

This notebook takes you from nothing to a feature of Gemma 3 270M you can read, plot and steer with.
It runs on a laptop CPU, offline. You will:

1. load the model and a sparse autoencoder (SAE) for layer 6 `resid_post`;
2. read the activations at the SAE's site and encode a sentence into features;
3. index what every latent does over a slice of the corpus;
4. show the strongest features of each token, as a table and a heat-map;
5. look at one feature's top contexts and its logit lens;
6. steer generation with that feature;
7. measure the SAE: L0, FVU and ΔLM loss;
8. load one of DeepMind's published Gemma Scope SAEs for Gemma 2 (needs the network).

The SAE is the one `make demo` trains. If you have not run `make demo`, the next cells train a small
one here first (about two minutes on two cores): it is far weaker than the demo's, so the features
it finds are blurrier, but every step below works the same way.""",
    ),
    (
        "code",
        """\
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import gemmascope
from gemmascope.hooks import collect, splice
from gemmascope.models import load_model, model_info

torch.manual_seed(0)
LAYER, SITE = 6, "resid_post"
# Where `make demo` wrote its SAE (run from the repository root or from docs/).
DEMO_OUT = Path(os.environ.get("DEMO_OUT", "demo-out"))
if not DEMO_OUT.exists() and Path("..", DEMO_OUT).exists():
    DEMO_OUT = Path("..", DEMO_OUT)
DEMO_SAE = DEMO_OUT / "sae" / "layer_6_resid_post_w4096_jumprelu_l0_50"
WORK = Path("tutorial-out")  # what this notebook writes""",
    ),
    (
        "markdown",
        """\
## 1. The model and the SAE

`load_model("gemma-3-270m")` loads the embedded model: the first call converts it into
`~/.cache/gemmascope` (a minute or two), later calls take seconds. A *site* is a place in a layer
where activations are read: `resid_post` is the residual stream leaving block 6.""",
    ),
    (
        "code",
        """\
model, tokenizer = load_model("gemma-3-270m")
info = model_info(model)
print(info)
print("width of layer 6 resid_post:", info.site_width(SITE))""",
    ),
    (
        "markdown",
        """\
If `make demo` has run, we load its SAE. Otherwise we cache 20k tokens of layer 6 `resid_post`
activations from the embedded corpus and train a 1,024-latent JumpReLU SAE with a target L0 of 32 on
them, the same steps as `gemmascope cache` and `gemmascope train`, at a toy size. Both steps resume:
rerun the cell and finished work is skipped.""",
    ),
    (
        "code",
        """\
from gemmascope.activations import CacheConfig, CachedActivations, build_cache
from gemmascope.train import SAESpec, TrainConfig, train

if DEMO_SAE.exists():
    sae_path = DEMO_SAE
    print(f"using the SAE trained by `make demo`: {sae_path}")
else:
    print("no SAE from `make demo`: training a small one (about two minutes on two cores)")
    cache = build_cache(
        CacheConfig(
            out=WORK / "cache", layers=str(LAYER), sites=[SITE], tokens=20_000, context_size=256
        ),
        model=model,
        tokenizer=tokenizer,
        progress=False,
    )
    data = CachedActivations(cache, (LAYER, SITE), batch_size=500, seed=0)
    spec = SAESpec(layer=LAYER, site=SITE, width=1024, target_l0=32)
    config = TrainConfig(
        tokens=200_000,
        batch_size=500,
        lr=2e-3,
        encoder_init_scale=0.1,  # the short-run options of `make demo` (README, Training)
        standardize=True,
        model="gemma-3-270m",
        dataset="default",
        context_size=256,
    )
    train([spec], data.batches, config, WORK / "sae", resume=True, progress=False)
    sae_path = WORK / "sae" / spec.name

sae = gemmascope.load(sae_path)
sae""",
    ),
    (
        "markdown",
        """\
## 2. Activations at the SAE's site, encoded

`collect` runs the model once and stops right after the requested site, so layers 7-17 never run.
The SAE turns each 640-wide activation into 1,024 latents (4,096 for the demo's SAE), almost all
of them zero.
The first token is BOS; its activation is huge and the SAE never trained on it, so we leave it out.""",
    ),
    (
        "code",
        """\
text = "The whale surfaced beside the ship, and the sailors shouted from the deck."
ids = tokenizer(text, return_tensors="pt").input_ids  # [1, seq]
site = (sae.cfg.layer, sae.cfg.site)
x = collect(model, ids, [site])[site]  # [1, seq, 640]
with torch.no_grad():
    z = sae.encode(x)[0]  # [seq, d_sae], mostly zeros
    x_hat = sae.decode(z)  # [seq, 640]
tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
z[0] = 0  # BOS
residual = (x[0, 1:] - x_hat[1:]).pow(2).sum()
fvu = residual / (x[0, 1:] - x[0, 1:].mean(0)).pow(2).sum()
print(
    f"{len(tokens)} tokens; latents active per token (L0): {(z[1:] > 0).sum(1).float().mean():.1f}; "
    f"fraction of variance unexplained on this sentence: {fvu:.3f}"
)""",
    ),
    (
        "markdown",
        """\
## 3. Which latents say something: an index over the corpus

A latent's meaning shows in the texts that make it fire. `build_index` runs the SAE over part of
the corpus (4k tokens here; `gemmascope index` uses 1M by default) and keeps, per latent, how often
it fires (its *density*), its top contexts, an activation histogram and its logit lens. The same
file feeds the browser explorer (`gemmascope explore`). A short training run leaves some *dense*
latents, active on more than 10% of all tokens: they say little about any one token, so the table
and the heat-map below leave them out.""",
    ),
    (
        "code",
        """\
from gemmascope.explore import IndexConfig, IndexDB, build_index

index_path = WORK / f"{sae_path.name}.sqlite"
if not index_path.exists():
    build_index(
        IndexConfig(
            sae_source=str(sae_path), out=index_path, tokens=4096, context_size=256, batch_size=8
        ),
        model=model,
        tokenizer=tokenizer,
        sae=sae,
        progress=False,
    )
db = IndexDB(index_path)
_, rows = db.list_features(per_page=sae.cfg.d_sae)
density = torch.zeros(sae.cfg.d_sae)  # share of indexed tokens each latent fires on
for row in rows:
    density[row["id"]] = row["density"]
dense = density > 0.1
print(
    f"{int(dense.sum())} dense latents; {int((density == 0).sum())} of {sae.cfg.d_sae} "
    "never fired on the indexed text"
)""",
    ),
    (
        "markdown",
        """\
## 4. The strongest features of each token

A small table: for each token, the three latents with the largest activation (a token with none
had only dense latents active).""",
    ),
    (
        "code",
        """\
z_kept = z * ~dense  # [seq, d_sae] without the dense latents
values, latents = z_kept.topk(3, dim=1)  # [seq, 3]
print(f"{'token':>12} | top features (activation)")
for t in range(1, len(tokens)):
    pairs = zip(values[t].tolist(), latents[t].tolist(), strict=True)
    top = ", ".join(f"#{i:<5d}({v:.2f})" for v, i in pairs if v > 0)
    print(f"{tokens[t]!r:>12} | {top}")""",
    ),
    (
        "markdown",
        """\
And a heat-map of the twelve latents with the largest activation anywhere in the sentence.""",
    ),
    (
        "code",
        """\
peak = z_kept.max(dim=0).values  # [d_sae]
chosen = peak.topk(12).indices
fig, ax = plt.subplots(figsize=(10, 4))
image = ax.imshow(z_kept[:, chosen].T.numpy(), aspect="auto", cmap="viridis")
ax.set_xticks(range(len(tokens)), [repr(t) for t in tokens], rotation=60, ha="right", fontsize=8)
ax.set_yticks(range(len(chosen)), [f"#{i}" for i in chosen.tolist()], fontsize=8)
ax.set_title(f"SAE latents on layer {LAYER} {SITE}")
fig.colorbar(image, ax=ax, label="activation")
plt.tight_layout()
plt.show()""",
    ),
    (
        "markdown",
        """\
## 5. One feature: its top contexts and its logit lens

We follow the strongest latent of the heat-map. Its top contexts are the indexed texts where it
fired most; its *logit lens* is the output tokens its decoder direction promotes and suppresses when
carried straight to the unembedding. Layer 6 is early in Gemma 3 270M's 18 layers: many of its
features respond to one input token, and their logit lens is often noise; features of later layers,
closer to the output, tend to have clearer lenses.""",
    ),
    (
        "code",
        """\
feature = chosen[0].item()
page = db.feature(feature)
print(
    f"feature #{feature}: active on {page['density']:.2%} of indexed tokens, "
    f"max activation {page['max_act']:.2f}"
)""",
    ),
    (
        "code",
        """\
def show(context, width=10):
    \"\"\"A context as text, the peak token in [[brackets]].\"\"\"
    toks, p = context["tokens"], context["peak"]
    left = "".join(t["text"] for t in toks[max(0, p - width) : p])
    right = "".join(t["text"] for t in toks[p + 1 : p + 1 + width // 2])
    return f"{context['value']:5.2f}  {left}[[{toks[p]['text']}]]{right}".replace("\\n", " ")


print("top contexts:")
for context in page["top_contexts"][:6]:
    print(" ", show(context))
lens = page["logit_lens"]
print("promotes:  ", [t["text"] for t in lens["top"][:8]])
print("suppresses:", [t["text"] for t in lens["bottom"][:8]])""",
    ),
    (
        "markdown",
        """\
## 6. Steering: add the feature's direction while the model writes

Steering adds `strength × W_dec[feature]` (the latent's decoder direction) to the activations at
the SAE's site, at every position, while the model generates, as if the latent fired that strongly
everywhere. `splice` installs the change for the duration of the `with` block only. The explorer's
steering panel does the same. Too weak a push changes nothing, too strong a one makes the model
repeat a token: a feature's useful range is found by trying a few strengths.""",
    ),
    (
        "code",
        """\
from transformers import GenerationConfig

greedy = GenerationConfig(
    max_new_tokens=12,
    do_sample=False,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id,
)


def generate(prompt):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


direction = sae.W_dec[feature].detach()  # [640]
prompt = "My favourite place in the world is"
print("prompt:   ", prompt)
print("unsteered:", generate(prompt))
for times in (0.5, 1, 2):
    push = times * page["max_act"] * direction  # [640]
    with splice(model, sae.cfg.layer, sae.cfg.site, lambda value, push=push: value + push):
        print(f"#{feature} added at {times} x its max activation:", generate(prompt))""",
    ),
    (
        "markdown",
        """\
## 7. How good is the SAE? L0, FVU and ΔLM loss

`evaluate` runs held-out documents through the model and scores the SAE as the Gemma Scope paper did:
*L0* is the mean number of active latents per token; *FVU* the fraction of the activations' variance
the reconstruction misses; *ΔLM loss* how much the model's next-token loss (in nats) rises when the
reconstruction replaces the real activations. The fraction of loss recovered, which compares that
with zeroing the site, costs two more forwards per batch, so we skip it here (`ablations=False`).
512 tokens keep this quick; use 100k or more for numbers you report, as `make demo` does.""",
    ),
    (
        "code",
        """\
from gemmascope.evaluate import evaluate

(record,) = evaluate(
    model,
    tokenizer,
    [sae],
    corpus="default",
    split="eval",
    tokens=512,
    context_size=256,
    batch_size=2,
    ablations=False,
)
for key in ("l0", "fvu", "cosine", "delta_lm_loss"):
    print(f"{key:>15}: {record[key]:.3f}")""",
    ),
    (
        "markdown",
        """\
## 8. A published Gemma Scope SAE for Gemma 2

DeepMind published Gemma Scope's SAEs on the Hugging Face Hub, one repository per model and site
(`google/gemma-scope-2b-pt-res` holds the residual-stream SAEs of Gemma 2 2B), one SAE per `sae_id`
(`layer_{L}/width_{W}/average_l0_{N}`). `gemmascope.load` downloads only the chosen SAE's
`params.npz`. This needs the network, so the cell runs only when `GEMMASCOPE_ONLINE=1` is set in the
environment that started Jupyter.""",
    ),
    (
        "code",
        """\
ONLINE = os.environ.get("GEMMASCOPE_ONLINE") == "1"
if ONLINE:
    repo = "google/gemma-scope-2b-pt-res"
    ids_20 = [i for i in gemmascope.list_sae_ids(repo) if i.startswith("layer_20/width_16k/")]
    print(f"{repo}: layer 20, width 16k:", ids_20)
    gemma_scope_sae = gemmascope.load(repo, sae_id="layer_20/width_16k/average_l0_71")
    print(gemma_scope_sae)
else:
    print("offline: set GEMMASCOPE_ONLINE=1 to download a Gemma Scope SAE from the Hub")""",
    ),
    (
        "markdown",
        """\
To use it you need Gemma 2 2B itself: accept its licence on the Hub, log in with `hf auth login`,
and have about 12 GB of memory free. Everything above then works unchanged, with layer 20:""",
    ),
    (
        "code",
        """\
if ONLINE and os.environ.get("GEMMASCOPE_GEMMA2") == "1":
    gemma2, gemma2_tokenizer = load_model("google/gemma-2-2b")
    ids2 = gemma2_tokenizer(text, return_tensors="pt").input_ids
    x2 = collect(gemma2, ids2, [(20, "resid_post")])[20, "resid_post"]
    with torch.no_grad():
        z2 = gemma_scope_sae.encode(x2)[0]
    print("L0 per token:", (z2[1:] > 0).sum(1).tolist())
else:
    print("skipped: set GEMMASCOPE_ONLINE=1 and GEMMASCOPE_GEMMA2=1 to run Gemma 2 2B")""",
    ),
    (
        "markdown",
        """\
## Next

- Explore every feature in your browser:
  `gemmascope index <sae folder> --tokens 250k --out features.sqlite`, then
  `gemmascope explore features.sqlite`.
- Train a sweep over layers, widths and sparsities: see the docs' quickstart and CLI reference.
- The concepts behind the numbers (sites, JumpReLU, L0, FVU, ΔLM loss) are in the docs' *Concepts*.""",
    ),
]


def build() -> nbformat.NotebookNode:
    """The tutorial notebook, without outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb.cells = [make[kind](source) for kind, source in CELLS]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids, so rebuilding changes nothing
    return nb


def main() -> None:
    text = nbformat.writes(build())
    if "--check" in sys.argv:
        if NOTEBOOK.read_text() != text:
            sys.exit(f"{NOTEBOOK} is out of date; run python docs/build_tutorial.py")
        return
    NOTEBOOK.write_text(text)


if __name__ == "__main__":
    main()
