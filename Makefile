# Quick start:  make demo   (set up + a small collection + a small transfer experiment, end to end)
#               make test   (set up + the test suite; .ci/run calls exactly this)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= $(or $(OBLIVION_DATA),.data)
SHARED_DATA ?= ../shared/data
OUT    ?= runs/demo
# The workplace copy of CIFAR-10 is rebuilt (its md5s differ from torchvision's): say so explicitly.
CIFAR_FLAG := $(if $(wildcard $(SHARED_DATA)/extract.sh),--unverified-cifar10,)

.PHONY: setup services data demo test bench clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Datasets in torchvision's layout under $(DATA): from the local copy when there is one, else downloaded.
data: setup
	@if [ -x $(SHARED_DATA)/extract.sh ]; then $(SHARED_DATA)/extract.sh $(DATA); \
	else $(PY) -m collectors.data --data-root $(DATA) --download; fi

# End to end on small defaults: collect 10 sweeps, then a transfer experiment with the shipped KNOWN.
demo: data
	$(PY) collectors/launch.py --config configs/demo.yaml --collection $(OUT) --data-root $(DATA) $(CIFAR_FLAG)
	RAY_ADDRESS=local $(PY) -m evaluation.transfer --config configs/eval-smoke.yaml --data-root $(DATA)

# Two test processes, each test file whole in one (its Ray cluster and fixtures stay shared): most of the suite
# waits on process and cluster start-ups, which two processes overlap on two cores. TEST_WORKERS=0: one process.
# Tests marked solo (the fake autoscaler's) then run alone: beside another test's Ray cluster their actors died.
TEST_WORKERS ?= 2
test: setup services
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not solo" --durations=15
	$(PY) -m pytest -m solo

# PostgreSQL for the team-MLflow test (infra/mlflow/start.sh): Debian's package, installed when we can.
services:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1; } \
	    || echo "could not install postgresql: the team-MLflow test will be skipped"; \
	  else echo "PostgreSQL is not installed (apt-get install postgresql): the team-MLflow test will be skipped"; fi; \
	fi

bench: data
	OBLIVION_DATA=$(DATA) $(PY) bench/recording_overhead.py
	OBLIVION_DATA=$(DATA) $(PY) bench/parallel_scaling.py
	OBLIVION_DATA=$(DATA) $(PY) bench/real_sweeps.py $(CIFAR_FLAG)
	$(PY) bench/predict_speed.py
	$(PY) bench/stream_throughput.py --shards $(OUT)
