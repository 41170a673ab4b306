# `make demo` and `make test` create .venv when it is missing, then run.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
NPROC ?= 2

.PHONY: demo demo-tuneclip test test-slow env clean-demo

env: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus $(NPROC) --module tuneclip_ds.train --config configs/demo.yaml

# TuneCLIP's two stages, fine-tuning the model `make demo` trained (made first if missing).
demo-tuneclip: $(STAMP)
	test -f runs/demo/checkpoints/latest || $(MAKE) demo
	$(PYTHON) -m tuneclip_ds.export runs/demo --output runs/demo/model.pt
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus $(NPROC) --module tuneclip_ds.train --config configs/tuneclip_demo.yaml

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow -o addopts= tests

clean-demo:
	rm -rf runs/demo runs/tuneclip_demo data/synthetic
