# Two commands do all set-up: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test faults lint install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The stamps re-run the install whenever the dependency lists change.
$(VENV)/.installed: $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps img2dataset==1.47.0
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python launch/demo.py --out demo_out

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

test: $(VENV)/.installed-test lint
	$(BIN)/python -m pytest -q

# The fault suite (docs/reliability.md): end-to-end fault scenarios, one line each at the end of the run;
# FAULT_TABLE=FILE also writes the table as markdown. `make test` runs them too (marker faults).
faults: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests -m faults -q -n 2

clean:
	rm -rf demo_out sweeps bench_out .pytest_cache .ruff_cache
