# Two commands do all set-up: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
NODE := .venv-node
AZURITE ?= azurite@3.37.0

.PHONY: demo demo-s3 test quick faults lint install clean gpu-bundle gpu-check bench-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The stamps re-run the install whenever the dependency lists change.
$(VENV)/.installed: $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(NODE)/.installed
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps img2dataset==1.47.0
	touch $@

# Azurite, the Azure Blob emulator of tests/shard_tools/test_protocols_gcs_azure.py and benchmarks/stream.py, is an npm package: it goes
# under .venv-node/ (node and npm are on the development and CI machines; without npm the Azure tests skip, saying so).
$(NODE)/.installed:
	@if command -v npm >/dev/null; then \
	    npm install --silent --no-audit --no-fund --prefix $(NODE) $(AZURITE) && touch $@; \
	else echo "npm not found: Azurite not installed, the Azure Blob tests will skip"; fi

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python launch/demo.py --out demo_out

# Training from S3 next to local disk (docs/storage.md): a local S3 server (moto, a test extra), a proxy that
# adds latency, and the reader's figures of both runs side by side.
demo-s3: $(VENV)/.installed-test
	$(BIN)/python launch/demo_s3.py --out demo_s3_out

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# The whole suite, on two processes (pytest-xdist); `make quick` is the loop without the slow kinds.
test: $(VENV)/.installed-test lint
	$(BIN)/python -m pytest -q -n 2

quick: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow"

# What the GPU machine lacks, as wheels for its Python 3.12 (see docs/performance.md): carry .gpu-bundle along
# and run `make gpu-check` there, or python3 -m benchmarks.gpu_check directly (it needs none of them).
GPU_PY ?= 3.12
gpu-bundle: $(BIN)/python
	rm -rf .gpu-bundle && mkdir -p .gpu-bundle
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .gpu-bundle webdataset braceexpand
	du -sh .gpu-bundle

gpu-check:
	python3 -m pip install -q --no-index --no-deps --target /tmp/stream-ssl-site .gpu-bundle/*.whl 2>/dev/null; \
	PYTHONPATH=/tmp/stream-ssl-site:. python3 -m benchmarks.gpu_check --out gpu_check.md

# LitData and MosaicML Streaming for benchmarks/stream.py, in their own environment (their pins clash with ours).
bench-venv:
	$(PY) -m venv .venv-bench
	.venv-bench/bin/pip install -q torch==2.14.1 litdata mosaicml-streaming

# The fault suite (docs/reliability.md): end-to-end fault scenarios, one line each at the end of the run;
# FAULT_TABLE=FILE also writes the table as markdown. `make test` runs them too (marker faults).
faults: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests -m faults -q -n 2

clean:
	rm -rf demo_out demo_s3_out sweeps bench_out .pytest_cache .ruff_cache
