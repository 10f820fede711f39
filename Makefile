# `make demo` and `make test` bootstrap .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench bwrap

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

# The tiny recipe so far: the built-in corpus filtered and packed (1 min), a tiny model pretrained on it (2-3 min on
# 2 cores), instruction-tuned on the built-in checkable tasks (1-4 min), a reward model on built-in preference pairs
# (about 2 min), RLHF against it (a few min), text from the models; then the real Gemma 3 270M.
# Each stage runs once (meta.json and result.json are written last); a stopped stage resumes.
DEMO_DATA := runs/data/builtin/tokens/meta.json
DEMO_MODEL := runs/tiny/pretrain/result.json
DEMO_SFT := runs/tiny/sft/result.json
DEMO_REWARD := runs/tiny/reward/result.json
DEMO_RLHF := runs/tiny/rlhf/result.json

$(DEMO_DATA): | $(STAMP)
	$(BIN)/gemmalab data prepare --config configs/data/builtin.toml

$(DEMO_MODEL): $(DEMO_DATA)
	$(BIN)/gemmalab pretrain --config configs/train/tiny.toml --resume

$(DEMO_SFT): $(DEMO_MODEL)
	$(BIN)/gemmalab sft --config configs/sft/tiny.toml --resume

$(DEMO_REWARD): $(DEMO_SFT)
	$(BIN)/gemmalab reward --config configs/reward/tiny.toml --resume

$(DEMO_RLHF): $(DEMO_REWARD)
	$(BIN)/gemmalab rlhf --config configs/rlhf/tiny.toml --resume

demo: $(DEMO_RLHF) bwrap
	$(BIN)/gemmalab generate --model runs/tiny/pretrain/model --max-new-tokens 40 --temperature 0 \
		--prompt "Find the greatest common divisor of 84 and 36 using the Euclidean algorithm."
	$(BIN)/gemmalab generate --model runs/tiny/sft/model --chat --max-new-tokens 16 \
		--prompt "Sort these digits from smallest to largest: 7, 2, 5"
	$(BIN)/gemmalab generate --model runs/tiny/rlhf/model --chat --max-new-tokens 16 \
		--prompt "Sort these digits from smallest to largest: 7, 2, 5"
	$(BIN)/gemmalab generate --model gemma3-270m --prompt "The capital of France is" --max-new-tokens 32

test: $(STAMP) bwrap
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info
