# Everything runs inside a virtual environment created on first use.
#   make encode                     demo: synthetic shards + tiny encoders, encoded on CPU (~1 min)
#   make encode PRESET=imagenet256 SOURCE='data/imagenet-train-{0000..1281}.tar'
#   make encode SOURCE=... VAE=... DINO=... TEXT=...   any corpus and encoders
#   make train / make sample / make test / make bench-encode / make bench-reader
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DATA ?= data/demo
TINY ?= models/tiny
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c GPU)
NPROC ?= $(if $(filter-out 0,$(NGPU)),$(NGPU),1)
LAUNCH = $(if $(filter 1,$(NPROC)),$(VENV)/bin/repa,$(VENV)/bin/accelerate launch --multi_gpu --num_processes $(NPROC) -m pipeline)

# With no SOURCE the demo preset is used (and its assets generated); with SOURCE, the CLI defaults
# (SD-VAE, DINOv2-B) unless PRESET, VAE, DINO or TEXT say otherwise.
ifeq ($(origin SOURCE),undefined)
PRESET ?= demo
ENCODE_DEPS := demo-assets
endif
CONFIG_ARG = $(if $(PRESET),--config configs/$(PRESET).toml)
opt = $(if $(2),$(1) '$(2)')
ENCODE_ARGS = $(CONFIG_ARG) $(call opt,--source,$(SOURCE)) $(call opt,--cache,$(CACHE)) $(call opt,--vae,$(VAE)) \
	$(call opt,--dino,$(DINO)) $(call opt,--text-encoder,$(TEXT)) $(call opt,--resolution,$(RES)) $(ARGS)

.PHONY: install encode demo-assets test bench-encode bench-reader clean help

help:
	@sed -n '1,6p' Makefile

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

$(DEMO_DATA)/.done: | $(STAMP)
	$(VENV)/bin/repa data demo --out $(DEMO_DATA)
	touch $@

$(TINY)/.done: | $(STAMP)
	$(VENV)/bin/repa encoders tiny --out $(TINY)
	touch $@

demo-assets: $(DEMO_DATA)/.done $(TINY)/.done

encode: $(STAMP) $(ENCODE_DEPS)
	$(LAUNCH) encode $(ENCODE_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS); rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" && rc=0; exit $$rc

bench-encode: $(STAMP)
	$(PY) bench/encode_cpu.py $(ARGS)

bench-reader: $(STAMP)
	$(PY) bench/reader.py $(ARGS)

clean:
	rm -rf cache/demo runs/demo samples/demo $(DEMO_DATA) $(TINY) bench/out
