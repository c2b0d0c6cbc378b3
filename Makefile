# RetinaGate: `make demo` shows the whole product on this machine; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The extras a developer machine needs: CPU inference, training/export, the embedded Redis, tests.
EXTRAS := cpu,train,dev,embedded

.PHONY: help venv lint typecheck test test-fast demo bench clean

help:
	@echo "make demo       set up, make synthetic studies, train, export, serve and score them end to end"
	@echo "make test       lint, type-check and run the whole test suite (slow and interop tests included)"
	@echo "make test-fast  the suite without slow and interop tests"
	@echo "make bench      run the CPU benchmarks under bench/"
	@echo "make clean      remove var/ (demo data, models, databases) and the tool caches"

$(BIN)/retinagate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

venv: $(BIN)/retinagate

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check retinagate dicom_gateway worker train export

typecheck: venv
	$(BIN)/mypy

# One pytest-xdist worker per core (at most 4): many tests mostly wait on Redis, Orthanc and worker
# processes. The fault tests stay in one group, run one after another (tests/faults/conftest.py).
# The 20 slowest tests are listed last: the suite must stay under 15 minutes on a 2-core machine.
PARALLEL := -n auto --maxprocesses 4 --dist loadgroup

test: lint typecheck
	$(BIN)/python -m pytest -q $(PARALLEL) --durations=20

test-fast: venv
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not slow and not interop"

demo: venv
	$(BIN)/retinagate demo

bench: venv
	@for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
