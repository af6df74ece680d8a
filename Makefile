# make run: serve on http://127.0.0.1:5000 (PORT=8000 make run for another port)
# make test: install the test extras, run the whole suite and report its branch coverage (gunicorn workers included)
# make demo: the question's global counter, stock Flask-Session and Tally under the same load, in one table
# make mutants: mutation testing of the store, session, counter and security code (docs/mutants.md)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: run test demo lint format bench clean mutants

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet --editable '.[redis]'
	touch $@

$(VENV)/.installed-bench: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet --editable '.[bench]'
	touch $@

$(VENV)/.installed-test: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet --editable '.[test]'
	touch $@

$(VENV)/.installed-mutants: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet --editable '.[mutants]'
	touch $@

run: $(VENV)/.installed-run
	$(BIN)/gunicorn --config gunicorn.conf.py --bind $(HOST):$(PORT) run:app

# Coverage follows every Python process the tests start (pyproject.toml [tool.coverage.run]); each
# writes its own data file, and combine merges them.  .ci/run then checks the total against a floor.
test: $(VENV)/.installed-test
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest $(PYTEST_ARGS)
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report

# Needs only what make run installs: gunicorn on loopback ports, sessions on files.
demo: $(VENV)/.installed-run
	$(BIN)/python bench/demo.py

# Needs wrk and redis-server (apt-get install -y wrk redis-server). Sync, gthread and gevent workers, about
# 11 minutes; BENCH_ARGS="--only scale" runs the 1M-session runs alone (docs/benchmarks.md).
bench: $(VENV)/.installed-bench
	$(BIN)/python bench/harness.py $(BENCH_ARGS)

# A fresh run each time: mutmut would otherwise keep verdicts that changed tests may have changed.
# src/ is never touched: mutmut mutates a copy in mutants/, which tests/mutation/ hands to gunicorn.
# The venv's bin/ goes first on PATH for the mypy that weeds out mutants of the wrong type.
mutants: $(VENV)/.installed-mutants
	rm -rf mutants
	PATH=$(CURDIR)/$(BIN):$$PATH PYTHONPATH=$(CURDIR)/tests/mutation \
	  $(BIN)/mutmut run --max-children $(or $(MUTANT_CHILDREN),2)
	$(BIN)/mutmut results

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache .coverage .coverage.* htmlcov
