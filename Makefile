# The README's two commands are `make demo` and `make test`; both set up .venv
# (if missing), install malla with its test extra, and build the extension.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.malla-installed
CORE   := malla/_core.pyx malla/_core.pxd
PYTEST_ARGS ?=

.PHONY: all build demo test test-long bench soak fuzz debug lint clean distclean

all: build

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP): $(VPY) pyproject.toml setup.py
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Rebuild the extension in place whenever the Cython sources change.
build: $(STAMP) $(CORE)
	$(VPY) setup.py -q build_ext --inplace

demo: build
	$(VPY) -m malla demo

test: build
	$(VPY) -m pytest -q -x -p no:cacheprovider $(PYTEST_ARGS)

test-long: build
	MALLA_TEST_LONG=1 $(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: build
	$(VPY) -m pip install -q -e '.[test,bench]'
	$(VPY) -m bench

soak: build
	MALLA_SOAK=long $(VPY) -m pytest -q -p no:cacheprovider tests/test_soak.py

fuzz: build
	@echo "fuzzing is not built yet: see docs/roadmap.md"; exit 1

debug: $(STAMP)
	MALLA_DEBUG=1 MALLA_BUILD_CYTHON_ALWAYS=1 $(VPY) setup.py -q build_ext --inplace

clean:
	rm -rf build malla/_core.c malla/_core.html malla/*.so

distclean: clean
	rm -rf $(VENV) *.egg-info
