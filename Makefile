# `make demo` and `make test` create .venv when it is missing, then run.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
NPROC ?= 2

.PHONY: demo test test-slow env reproduce pretrain clean-demo

env: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# TuneCLIP (stage I, then HGCL) beside naive fine-tuning of the shipped pretrained model, 2 CPU ranks each.
demo: $(STAMP)
	$(PYTHON) -m tuneclip_ds.demo --nproc $(NPROC)

# The miniature reproduction (about 75 min on 2 cores): docs/reproduce/.
reproduce: $(STAMP)
	$(PYTHON) benchmarks/reproduce/run.py --nproc $(NPROC)

# Makes tuneclip_ds/pretrained/ again (the shipped model and its card).
pretrain: $(STAMP)
	$(PYTHON) benchmarks/reproduce/pretrain.py --nproc $(NPROC)

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow -o addopts= tests

clean-demo:
	rm -rf runs/demo data/shapes/train
