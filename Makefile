# Quick start:  make demo   (runs the main job on a built-in default)
#               make test   (runs the test suite, < 10 minutes on 2 cores)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: venv demo test test-all bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,data,hf]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: venv
	$(PY) -m pip install -q -e '.[bench]' || echo "some benchmark peers did not install: the report lists them as not installed"
	$(PY) -m longattn demo

test: venv
	$(PY) -m pytest -q -m "not slow" --timeout=600

test-all: venv
	$(PY) -m pytest -q --timeout=1800

bench: venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m longattn bench

clean:
	rm -rf $(VENV) report .pytest_cache
