# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
#
# The interpreter: PYTHON=/path/to/python if given (make PYTHON=python3.12 ...),
# else the first CPython 3.11-3.13 among python3.13, python3.12, python3.11
# and python3 on PATH, then pyenv's ($PYENV_ROOT/versions/3.1x.*).  It only
# matters when .venv is created: `make clean` to switch.
SUPPORTED  := 3.13 3.12 3.11
PYENV_ROOT ?= $(HOME)/.pyenv
CANDIDATES  = $(strip $(foreach v,$(SUPPORTED),python$(v)) python3 \
              $(foreach v,$(SUPPORTED),$(wildcard $(PYENV_ROOT)/versions/$(v).*/bin/python$(v))))
IS_SUPPORTED := 'import sys; sys.exit(sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 13))'
PYTHON ?= $(shell for p in $(CANDIDATES); do \
              $$p -c $(IS_SUPPORTED) >/dev/null 2>&1 && { command -v $$p; break; }; done)

VENV := .venv
PY   := $(VENV)/bin/python

# What each target installs into .venv (editable): running needs only the
# package; tests add [test]; `make install` is the full development set-up.
EXTRAS_run   :=
EXTRAS_test  := [test]
EXTRAS_bench := [bench]
EXTRAS_dev   := [test,bench]
EXTRAS_mutation := [test,mutation]

.PHONY: install test demo bench lint clean fuzz mutation

install: $(VENV)/.installed-dev

$(PY):
	@test -n "$(PYTHON)" || { echo "shmdirty needs CPython 3.11, 3.12 or 3.13; none found" \
	    "(tried $(CANDIDATES)). Install one, or run make PYTHON=/path/to/python3.1x"; exit 1; }
	@$(PYTHON) -c $(IS_SUPPORTED) || { echo "$(PYTHON) is not CPython 3.11-3.13"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

KERNEL_SRC := $(wildcard shmdirty/_kernel_src/*.c shmdirty/_kernel_src/*.h)

$(VENV)/.installed-%: pyproject.toml $(KERNEL_SRC) | $(PY)  # the editable install compiles the kernel
	$(PY) -m pip install --quiet -e '.$(EXTRAS_$*)'
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest

# The receiver's fuzzer for longer than the suite's few seconds (tests/test_stream_fuzz.py).
FUZZ_EXAMPLES ?= 5000
fuzz: $(VENV)/.installed-test
	SHMDIRTY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_stream_fuzz.py

demo: $(VENV)/.installed-run
	$(VENV)/bin/shmdirty migrate

bench: $(VENV)/.installed-bench
	$(PY) -m perf

# issue 17.6: mutmut over the protocol code, ~30 min, a seeded sample per
# module (docs/TESTING.md); not part of `make test` or CI.
mutation: $(VENV)/.installed-mutation
	rm -rf mutants
	$(PY) tests/mutation_run.py $(MUTATION_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check shmdirty workers perf tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info mutants
