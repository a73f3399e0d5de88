# Quick start:  make demo   (set up + a small collection end to end)
#               make test   (set up + the test suite; .ci/run calls exactly this)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= $(or $(OBLIVION_DATA),.data)
SHARED_DATA ?= ../shared/data
OUT    ?= runs/demo
# The workplace copy of CIFAR-10 is rebuilt (its md5s differ from torchvision's): say so explicitly.
CIFAR_FLAG := $(if $(wildcard $(SHARED_DATA)/extract.sh),--unverified-cifar10,)

.PHONY: setup data demo test bench clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Datasets in torchvision's layout under $(DATA): from the local copy when there is one, else downloaded.
data: setup
	@if [ -x $(SHARED_DATA)/extract.sh ]; then $(SHARED_DATA)/extract.sh $(DATA); \
	else $(PY) -m collectors.data --root $(DATA) --download; fi

demo: data
	$(PY) collectors/launch.py --config configs/demo.yaml --out $(OUT) --data-root $(DATA) $(CIFAR_FLAG)

test: setup
	$(PY) -m pytest

bench: data
	OBLIVION_DATA=$(DATA) $(PY) bench/recording_overhead.py
	OBLIVION_DATA=$(DATA) $(PY) bench/parallel_scaling.py
	OBLIVION_DATA=$(DATA) $(PY) bench/real_sweeps.py $(CIFAR_FLAG)
	$(PY) bench/predict_speed.py
