# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml shmdirty/_kernel.c  # the editable install compiles the kernel
	@command -v $(PYTHON) >/dev/null || { echo "shmdirty needs $(PYTHON) (atomics ships wheels up to 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/shmdirty migrate

bench: $(STAMP)
	$(PY) -m perf

lint: $(STAMP)
	$(VENV)/bin/ruff check shmdirty workers perf tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info
