VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: setup demo test test-slow soak lint clean

setup: $(STAMP)

# torch is installed first and pinned: 2.13.0 is the CPU wheel this machine has on disk;
# letting pip resolve torch on its own would pull a multi-gigabyte CUDA build.
# setup: the project with its dev extra (tests, lint, Triton, lm-eval); the demo needs only
# the project itself (a minute or two less on a fresh clone), and takes a dev install as is.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e .
	touch $(RUN_STAMP)

demo: $(RUN_STAMP)
	$(VENV)/bin/modula demo --config configs/default.yaml

# two pytest processes: tests/multinode joins a multi-node Ray cluster, and a driver is
# connected to one Ray cluster at a time (the first session shares one local Ray); both run,
# and the target fails if either does
test: setup
	$(PY) -m pytest tests -m "not slow" --durations=15; main=$$?; \
	$(PY) -m pytest tests/multinode -m "not slow" --durations=5; multi=$$?; \
	test $$main -eq 0 -a $$multi -eq 0

# the tests that do not fit make test's 40 minutes on a 2-core machine (a killed worker, a
# killed sweep, ASHA, the model families but one): run by hand before a release
test-slow: setup
	$(PY) -m pytest tests -m slow --durations=10

# 10 minutes of mixed traffic against one service, a hot add-domain halfway (not in `test`)
soak: setup
	$(PY) benchmarks/soak.py --minutes 10

lint: setup
	$(VENV)/bin/ruff check modula tests benchmarks

clean:
	rm -rf runs .pytest_cache
