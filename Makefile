# The two quick-start commands: `make demo` trains and samples the embedded default on the CPU,
# `make test` runs the test suite. Both install into .venv first.
PYTHON ?= python3
VENV := .venv

.PHONY: demo test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip

demo: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e .
	$(VENV)/bin/python scripts/demo.py

test: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	$(VENV)/bin/python -m pytest -q
