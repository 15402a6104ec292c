# The README's commands. Everything runs in .venv, created and filled on first use; later runs
# reuse it and rebuild the extension incrementally (build/ keeps the CMake tree).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here only (the GPU machine has another torch; pyproject says torch>=2.4).
# The CUDA build, so the CUDA kernels compile and link even on a machine without a GPU.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
BUILD_DEPS := "scikit-build-core>=0.10" "cmake>=3.26" ninja
RUNTIME_DEPS := numpy pytest pyyaml matplotlib scikit-learn tqdm
# ncfast.integrations (optional for users: see the README's Dependencies); installed here so
# the tests exercise every adapter.
INTEGRATION_DEPS := torchmetrics lightning scipy curvlinops-for-pytorch tensorboard
# The docs site (make docs): mkdocs with the API reference from the docstrings.
DOCS_DEPS := mkdocs "mkdocstrings[python]"
OUT ?= bench-out

.PHONY: run test docs build bench gpu-check reproduce clean

run: build
	$(PY) -m ncfast train --overwrite

# The suite, then the docs build (warnings are errors): CI runs exactly this.
test: build
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory docs

# The user guide, docs/theory.md and the API reference into site/; any warning fails the build.
docs: $(VENV)/.installed
	$(PY) -m mkdocs build --strict --quiet

# The digits default over seeds 0-3 with 1 and 2 threads: checks every run collapses and writes
# the README's table (runs/default-check/table.md), checks.json and a figure.
reproduce: build
	$(PY) -m ncfast.experiments.default_run --out runs/default-check

bench: build
	$(PY) -m bench.loss --device cpu --out bench/results/cpu.md
	$(PY) -m bench.stats --device cpu --out bench/results/stats-cpu.md
	$(PY) -m bench.hvp --device cpu --out bench/results/hvp-cpu.md
	$(PY) -m bench.train --device cpu --out bench/results/train-cpu.md
	$(PY) -m bench.linear_loss --device cpu --out bench/results/linear-loss-cpu.md
	$(PY) -m bench.data --device cpu --out bench/results/data-cpu.md

# On a GPU machine with no network: builds offline against its torch, runs the CUDA tests and
# the benchmarks, writes everything into OUT.
gpu-check:
	bash bench/gpu_check.sh $(OUT)

build: $(VENV)/.installed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

$(VENV)/.installed: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) $(BUILD_DEPS) $(RUNTIME_DEPS) $(INTEGRATION_DEPS) \
		$(DOCS_DEPS)
	touch $@

clean:
	rm -rf build site
