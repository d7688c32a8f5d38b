# llava-queue: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# Which torch build `make install` gets: PyTorch's CPU wheels by default (an extra index, so a local or
# mirrored index still serves it offline); TORCH_INDEX=https://download.pytorch.org/whl/cu128 for CUDA 12.8;
# TORCH_INDEX= (empty) for whatever the installer's own indexes offer. Only torch comes from it (--no-deps);
# its dependencies come with the project's, from the installer's own indexes.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# The installer: uv (installed into a venv made without pip, by this Python's pip; pip then comes with the
# project's packages; a fresh venv in ~5 s when uv's cache holds them, where pip takes ~60-90 s) or pip.
# uv reads neither pip.conf nor PIP_INDEX_URL: it takes PIP_FIND_LINKS (a folder of wheels) from here, its
# own UV_INDEX_URL/UV_DEFAULT_INDEX; INSTALLER=pip uses pip and its configuration instead. uv installs the
# project's packages from its cache alone first (--offline: ~1 s, where asking the indexes takes ~7 s), then,
# when the cache lacks one, from the indexes; torch always from the indexes (a cached build of another kind
# must not stand in for TORCH_INDEX's).
INSTALLER ?= uv
ifeq ($(INSTALLER),pip)
INSTALL := $(BIN)/python -m pip install --quiet
INSTALL_CACHED := false
else
INSTALL := $(BIN)/uv pip install --quiet --python $(BIN)/python $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
INSTALL_CACHED := $(INSTALL) --offline
endif
# Python writes a module's bytecode when it first imports it, even where PYTHONDONTWRITEBYTECODE is set (as on
# this project's CI machines): otherwise every interpreter compiles torch and transformers again (a worker's
# imports: 4.7 s -> 13.3 s). Writing it then, not at install (uv --compile-bytecode: 24 s on 2 CPUs for 12.6k
# files), compiles only what runs (~2.7k files, 9 s); the install ends by importing what every worker and test
# process does, once, so that several processes starting together do not all compile it at the same time.
unexport PYTHONDONTWRITEBYTECODE
WARM_IMPORTS := $(BIN)/python -c "import importlib, devtools.devstack as d; [importlib.import_module(m) for m in d.PRELOAD]"
# Broker and result backend; when nothing answers there, devtools.devstack starts a redis-server on a free port.
export LLAVA_BROKER_URL ?= redis://localhost:6379/0
export LLAVA_RESULT_BACKEND ?= redis://localhost:6379/1
DEVSTACK := $(BIN)/python -m devtools.devstack --
# The suite runs in TEST_PROCS pytest-xdist processes, a test file to each (every process has its own Redis and
# workers); TEST_PROCS=0 runs it in this process alone.
TEST_PROCS ?= 3
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_PROCS) --dist loadfile --no-loadscope-reorder

.PHONY: demo test suite coverage lint unit integration images install clean bench bench-memory soak flower drill

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
ifeq ($(INSTALLER),pip)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
else
	test -x $(BIN)/python || $(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(BIN)/python install --quiet "uv>=0.8" \
	  || { $(BIN)/python -m ensurepip && $(BIN)/python -m pip install --quiet "uv>=0.8"; }
endif
	UV_HTTP_RETRIES=1 $(INSTALL) --no-deps "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
	  || { echo "install: $(TORCH_SPEC) from $(TORCH_INDEX) failed (not reachable?); trying the other indexes"; \
	       $(INSTALL) --no-deps "$(TORCH_SPEC)"; }
	$(INSTALL_CACHED) -e ".[worker,monitor,dev]" pip 2>/dev/null || $(INSTALL) -e ".[worker,monitor,dev]" pip
	$(WARM_IMPORTS)
	touch $@

demo: install
	$(DEVSTACK) $(BIN)/python examples/demo.py

# Lint runs beside the suite (both CPUs are busy either way; a lint failure fails `make test` all the same).
test: install
	$(MAKE) --no-print-directory -j2 lint suite

suite: install
	$(DEVSTACK) $(PYTEST)

# Line coverage of producer/ and worker/, the worker subprocesses included (see pyproject.toml).
coverage: install
	$(DEVSTACK) $(PYTEST) --cov --cov-report=term

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: install
	$(PYTEST) tests/unit

integration: install
	$(DEVSTACK) $(PYTEST) tests/integration

images: install
	$(BIN)/python examples/make_images.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# Caption throughput (seed loop / static batcher, through Redis), then the serving scenario (seed / static /
# continuous, Poisson arrivals) priced on an H100 roofline. BENCH_ARGS=--quick while developing.
bench: install
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/classify.py
	$(BIN)/python bench/serving.py $(BENCH_ARGS)
	$(BIN)/python bench/prefix.py
	$(BIN)/python bench/claim_check.py
	$(BIN)/python bench/claim_check.py --image-kb 8

# A worker's peak RSS with 8 concurrent 6300x6300 PNGs (see README "Security").
bench-memory: install
	$(BIN)/python bench/image_memory.py

# Repeat the fault tests (worker killed, poison job, SIGTERM mid-batch, Redis restarted); SOAK_ROUNDS=5.
SOAK_ROUNDS ?= 5
soak: install
	for round in $$(seq $(SOAK_ROUNDS)); do echo "soak round $$round"; \
	  $(DEVSTACK) $(BIN)/python -m pytest -q tests/integration/test_faults.py tests/integration/test_poison.py tests/integration/test_batching_worker.py || exit 1; done

# The Redis Sentinel failover drill: primary + replica + three Sentinels on loopback, a tiny worker, 200 jobs
# per scenario, the primary SIGKILLed twice and hung once (DRILL_ARGS="--jobs 40 --rate 8" for a short one).
drill: install
	$(BIN)/python -m devtools.drill $(DRILL_ARGS)

# Flower on the configured broker (LLAVA_BROKER_URL; auth: LLAVA_FLOWER_BASIC_AUTH=user:password).
flower: install
	$(BIN)/llava-queue flower
