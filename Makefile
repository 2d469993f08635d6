# The two commands of the README: `make run` and `make test`. Everything else is a step of those.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install services check bench bench-reads bench-shim bench-worker

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

services:
	scripts/ensure-services.sh

# Serve the API on 127.0.0.1:8000 (HTTPS with TLS=1) with a worker; prints a project id and token.
run: install services
	scripts/run.sh

test: install services
	$(VENV)/bin/pytest

check: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The throughput benchmark (not a test): a 1,000-thread fleet, 20 runs of 50 threads, then accept latency
# with 200 CI jobs that pause between appends while the workers work off a backlog.
bench: install services
	$(PY) tests/perf/bench.py --runs 1 --threads 1000 --appends 10 --tests 100
	$(PY) tests/perf/bench.py --runs 20 --threads 50 --appends 10 --tests 100
	$(PY) tests/perf/bench.py --runs 1 --threads 1000 --appends 10 --tests 100 --think-ms 500 --worker-delay 3

# The shim's instructions per result of thread appends, under callgrind: the same whatever the machine's speed.
bench-shim: install services
	$(PY) tests/perf/shim_instructions.py

# A worker's instructions per result applying batches of thread appends, under callgrind.
bench-worker: install services
	$(PY) tests/perf/worker_instructions.py

# Read latencies of a 1M-result run and a 100,000-case project while a fleet ingests, folds, webhook lag.
bench-reads: install services
	$(PY) tests/perf/reads.py
