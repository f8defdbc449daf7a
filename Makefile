# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs; torch is pinned through constraints.txt
# (the CPU build on this machine's disk) while pyproject.toml keeps a permissive range.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
PIN    := -c constraints.txt
export OMP_NUM_THREADS ?= 2

.PHONY: demo demo-full demo-core test lint typecheck pytest bench bench-compare compare docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

$(VENV)/.dev-installed: $(PY) pyproject.toml constraints.txt
	$(PIP) install $(PIN) -e '.[dev,docs]'
	@touch $@

$(VENV)/.demo-installed: $(PY) pyproject.toml constraints.txt
	$(PIP) install $(PIN) -e '.[demo]'
	@touch $@

$(VENV)/.bench-installed: $(VENV)/.dev-installed
	$(PIP) install $(PIN) -e '.[bench]'
	@touch $@

$(VENV)/.docs-installed: $(PY) pyproject.toml constraints.txt
	$(PIP) install $(PIN) -e '.[docs]'
	@touch $@

## demo: the main job on its built-in default — finetune all-MiniLM-L6-v2 with AdamW, LoRA,
## null-space and FoLoRA on stdlib docstrings, and measure what each forgets (a few minutes on 2 cores)
demo: $(VENV)/.demo-installed
	$(PY) -m rqcore_torch.demo

## demo-full: the documented run (6 seeds, lr chosen on a validation split); its table, JSON and
## PNGs go to docs/demo/, which docs/demo.md shows
demo-full: $(VENV)/.demo-installed
	$(PY) -m rqcore_torch.demo --full --out docs/demo

## demo-core: the core alone on synthetic activations (no torch)
demo-core: $(VENV)/.demo-installed
	$(PY) -m rqcore.demo

## test: lint, type-check, the docs build (warnings are errors) and the whole test suite
test: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check rqcore rqcore_torch tests benchmarks
	$(VENV)/bin/ruff format --check rqcore rqcore_torch tests benchmarks
	$(VENV)/bin/mypy
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest

## bench: asv benchmarks of the current checkout (environment_type: existing)
bench: $(VENV)/.bench-installed
	$(VENV)/bin/asv machine --yes
	$(VENV)/bin/asv run --python=same --quick --show-stderr

## bench-compare: the side-by-side peer comparisons; writes their tables and plots into docs/benchmarks.md
## (full sizes, tens of minutes on 2 cores; BENCH_ARGS=--quick for the smoke mode)
bench-compare: $(VENV)/.bench-installed
	$(PY) benchmarks/make_docs_benchmarks.py $(BENCH_ARGS)

## compare: side-by-side comparison scripts (rqcore vs its peers, interleaved, ratios)
compare: $(VENV)/.bench-installed
	$(PY) benchmarks/compare_covariance.py
	$(PY) benchmarks/compare_eigen.py
	$(PY) benchmarks/compare_projection.py

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist *.egg-info .asv site .mypy_cache .ruff_cache .pytest_cache demo-output
