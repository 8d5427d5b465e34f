VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torch is installed first and pinned: 2.13.0 is the CPU wheel this machine has on disk;
# letting pip resolve torch on its own would pull a multi-gigabyte CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/modula demo --config configs/default.yaml

test: setup
	$(PY) -m pytest tests --durations=15

lint: setup
	$(VENV)/bin/ruff check modula tests benchmarks

clean:
	rm -rf runs .pytest_cache
