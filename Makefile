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
# project's packages; a fresh venv in ~31 s where pip takes ~70-90 s) or pip.
# uv reads neither pip.conf nor PIP_INDEX_URL: it takes PIP_FIND_LINKS (a folder of wheels) from here, its
# own UV_INDEX_URL/UV_DEFAULT_INDEX; INSTALLER=pip uses pip and its configuration instead. Both compile the
# bytecode at install (uv: --compile-bytecode): under PYTHONDONTWRITEBYTECODE=1 nothing else would, and
# every interpreter would compile torch and transformers again (a worker's imports: 6.3 s -> 15.6 s).
INSTALLER ?= uv
ifeq ($(INSTALLER),pip)
INSTALL := $(BIN)/python -m pip install --quiet
else
INSTALL := $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
endif
# Broker and result backend; when nothing answers there, devtools.devstack starts a redis-server on a free port.
export LLAVA_BROKER_URL ?= redis://localhost:6379/0
export LLAVA_RESULT_BACKEND ?= redis://localhost:6379/1
DEVSTACK := $(BIN)/python -m devtools.devstack --
# The suite runs in TEST_PROCS pytest-xdist processes, a test file to each (every process has its own Redis and
# workers); TEST_PROCS=0 runs it in this process alone.
TEST_PROCS ?= 3
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_PROCS) --dist loadfile --no-loadscope-reorder

.PHONY: demo test suite coverage lint unit integration images install clean bench bench-memory soak flower

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
	$(INSTALL) -e ".[worker,monitor,dev]" pip
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

# Flower on the configured broker (LLAVA_BROKER_URL; auth: LLAVA_FLOWER_BASIC_AUTH=user:password).
flower: install
	$(BIN)/llava-queue flower
