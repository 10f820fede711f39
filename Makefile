# `make demo` and `make test` bootstrap .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench bwrap browser

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: this machine has the CPU wheel of 2.13.0 on disk; an unpinned torch would pull a CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# bubblewrap sandboxes generated code (gemmalab/evaluate/sandbox.py); sudo where we are not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null || echo sudo)
bwrap:
	@command -v bwrap >/dev/null || ($(SUDO) apt-get install -y bubblewrap || ($(SUDO) apt-get update && $(SUDO) apt-get install -y bubblewrap))

# Chromium opens the recipe's report in a test (tests/test_recipe.py): headless, from Debian.
browser:
	@command -v chromium >/dev/null || ($(SUDO) apt-get install -y --no-install-recommends chromium || ($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium))

# The tiny recipe (configs/recipes/tiny.toml, docs/recipe.md): the built-in corpus filtered and packed, a tiny model
# pretrained on it, instruction-tuned on the built-in checkable tasks, a reward model and RLHF, benchmarks, side by
# side and the memorization audit, then the report and the model card; about 8 minutes on 2 cores. A rerun skips
# the finished stages (a stopped one resumes). Then text from the models and from the real Gemma 3 270M.
TINY := runs/tiny-recipe

demo: $(STAMP) bwrap
	$(BIN)/gemmalab recipe --config configs/recipes/tiny.toml --out $(TINY)
	$(BIN)/gemmalab generate --model $(TINY)/pretrain/model --max-new-tokens 40 --temperature 0 \
		--prompt "Find the greatest common divisor of 84 and 36 using the Euclidean algorithm."
	$(BIN)/gemmalab generate --model $(TINY)/rlhf/model --chat --max-new-tokens 16 \
		--prompt "Sort these digits from smallest to largest: 7, 2, 5"
	$(BIN)/gemmalab generate --model gemma3-270m --prompt "The capital of France is" --max-new-tokens 32
	@echo "report: $(TINY)/report.html   model card: $(TINY)/MODEL_CARD.md"

test: $(STAMP) bwrap browser
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info
