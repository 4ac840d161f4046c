# The two quick-start commands: `make demo` trains and samples the embedded default on the CPU,
# `make test` runs the test suite. Both install into .venv first.
PYTHON ?= python3
VENV := .venv

.PHONY: demo demo-long demo-dreambooth test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip

demo: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e .
	$(VENV)/bin/python scripts/demo.py

# The same pipeline trained about four times longer (see the README for its figures).
demo-long: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e .
	$(VENV)/bin/python scripts/demo.py --ldm_steps 15000 --outdir outputs/demo-long

# LoRA DreamBooth of a new shape word on the demo's model (after `make demo`; README figures).
demo-dreambooth: $(VENV)/bin/python
	$(VENV)/bin/python scripts/demo_dreambooth.py --base_run "$$(ls -d logs/*_demo-txt2img | tail -1)"

test: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	$(VENV)/bin/python -m pytest -q
