# openllama-ray: `make demo` runs the whole pipeline on the shipped sample; `make test` is what CI runs.
# Everything runs from .venv (created with Python 3.11 on first use; reinstalled only when pyproject.toml changes).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO := .demo

.PHONY: demo test down faults bench plan lint

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"need Python 3.11, found {sys.version}"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	# a real LLaMA-style tokenizer.model for the export tests (its package's pins would downgrade numpy)
	$(BIN)/python -m pip install --no-deps mistral-common==1.13.1
	touch $(INSTALLED)

demo: $(INSTALLED)  ## start Ray + MLflow on 127.0.0.1 and run every stage as a Ray job (on CPU: the sample is tiny)
	JAX_PLATFORMS=cpu $(BIN)/openllama pipeline --out $(DEMO)

down: ## stop the services `make demo` started (by their recorded process groups)
	@if [ -x $(BIN)/openllama ]; then $(BIN)/openllama pipeline --out $(DEMO) --down; else echo "nothing to stop"; fi

lint: $(INSTALLED)
	$(BIN)/ruff check .

test: lint  ## ruff, then the whole test suite (pytest exits 5 when it collects nothing: that fails too)
	$(BIN)/pytest

faults: $(INSTALLED)  ## fault-injection suite (with the many-hosts faults, as root), then a table: fault -> what happened -> data lost -> time to recover, written into README.md
	@rm -f .faults.jsonl
	@OPENLLAMA_FAULT_REPORT=$(CURDIR)/.faults.jsonl $(BIN)/pytest tests/faults tests/test_multihost.py -m faults; status=$$?; \
	$(BIN)/python tests/harness.py .faults.jsonl --readme README.md; exit $$status

plan: $(INSTALLED)  ## the published presets compiled for their TPU slices by the TPU compiler (no TPU needed)
	JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 $(BIN)/python -P bench/plan.py

bench: $(INSTALLED)  ## every benchmark script; each prints ratios against a baseline it measures itself
	$(BIN)/python -m pip install --quiet -e '.[bench]'  # the baselines only benchmarks need (datatrove)
	@set -e; scripts="$$(ls bench/*.py 2>/dev/null)"; [ -n "$$scripts" ] || { echo "no bench/*.py scripts"; exit 1; }; \
	for script in $$scripts; do echo "== $$script"; $(BIN)/python $$script; done
