# Everything runs inside a virtual environment created on first use (PYTHON=python3.11 to choose).
#   make encode          demo: synthetic shards + tiny encoders, encoded on CPU (about a minute)
#   make train           demo: a small SiT + REPA trained on the demo cache on CPU (a few minutes)
#   make sample          demo: a grid of samples from the demo run
#   make encode PRESET=imagenet256 SOURCE='data/imagenet-train-{000000..001281}.tar'
#   make encode SOURCE=... VAE=... DINO=... TEXT=...      any corpus and encoders
#   make train  PRESET=imagenet256 | make train CACHE=... MODEL=SiT-XL/2 ...
#   make sweep | make report   a 6-run REPA ablation over the demo cache, and its comparison table
#   make add-targets     demo: add DINOv2-with-registers and SigLIP targets to the demo cache
#   make encode PRESET=rae-demo | make train PRESET=rae-demo | make sample PRESET=rae-demo
#                        RAE on the demo cache: a DiT-DH on DINOv2-with-registers tokens, a fitted tiny decoder
#   make sweep SWEEP=configs/sweep-targets.toml   the same SiT against each target and a pair
#   make sweep SWEEP=configs/sweep-methods.toml   SiT, REPA, REG, iREPA, dispersive loss over the demo cache
#   make lint            ruff and mypy over the code, as CI and pre-commit run them
#   make test | make test-fast | make bench-encode | make bench-reader | make bench-train | make bench-scale
#   make docs           regenerate docs/cli.md and docs/planning.md from the code
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DATA ?= data/demo
TINY ?= models/tiny
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c GPU)
NPROC ?= $(if $(filter-out 0,$(NGPU)),$(NGPU),1)
# Several processes through torchrun, one per GPU, or on a CPU-only machine as many gloo ranks (accelerate launch
# would start a single one there).
LAUNCH = $(if $(filter 1,$(NPROC)),$(VENV)/bin/repa,$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m pipeline)

# With neither SOURCE nor CACHE given the demo preset is used (and its assets generated); otherwise the
# CLI defaults (SD-VAE, DINOv2-B, SiT-XL/2) unless PRESET or the variables below say otherwise.
ifeq ($(origin SOURCE)$(origin CACHE),undefinedundefined)
PRESET ?= demo
ENCODE_DEPS := demo-assets
TRAIN_DEPS := cache/demo/manifest.json
endif
# rae-demo adds its target to the demo cache: that cache first.
ifeq ($(PRESET),rae-demo)
ENCODE_DEPS += cache/demo/manifest.json
endif
CONFIG_ARG = $(if $(PRESET),--config configs/$(PRESET).toml)
opt = $(if $(2),$(1) '$(2)')
ENCODE_ARGS = $(CONFIG_ARG) $(call opt,--source,$(SOURCE)) $(call opt,--cache,$(CACHE)) $(call opt,--vae,$(VAE)) \
	$(call opt,--dino,$(DINO)) $(call opt,--text-encoder,$(TEXT)) $(call opt,--resolution,$(RES)) $(ARGS)

TRAIN_ARGS = $(CONFIG_ARG) $(call opt,--cache,$(CACHE)) $(call opt,--run-dir,$(RUN)) $(call opt,--model,$(MODEL)) \
	$(call opt,--steps,$(STEPS)) $(call opt,--batch-size,$(BATCH)) $(ARGS)
SAMPLE_ARGS = $(CONFIG_ARG) $(call opt,--run-dir,$(RUN)) $(ARGS)

.PHONY: install encode add-targets demo-assets train sample lint test test-fast bench-encode bench-reader bench-train bench-scale docs clean help

help:
	@sed -n '/^#/p;/^PYTHON/q' Makefile

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e ".[test,wandb]"
	touch $(STAMP)

install: $(STAMP)

$(DEMO_DATA)/.done: | $(STAMP)
	$(VENV)/bin/repa data demo --out $(DEMO_DATA)
	touch $@

# The demo VAE is fitted to the demo images (about half a minute on 2 cores), so samples show shapes; the demo
# DINOv2 too, so that its tokens say which shape, colour and place each patch shows and REPA has a target; and a
# tiny RAE decoder to the DINOv2-with-registers tokens (about 40 s), for configs/rae-demo.toml.
$(TINY)/.done: $(DEMO_DATA)/.done | $(STAMP)
	$(VENV)/bin/repa encoders tiny --out $(TINY)
	$(VENV)/bin/repa encoders fit-vae --vae $(TINY)/vae-demo --source '$(DEMO_DATA)/cc12m-train-{0000..0003}.tar'
	$(VENV)/bin/repa encoders fit-dino --dino $(TINY)/dino --source '$(DEMO_DATA)/cc12m-train-{0000..0003}.tar'
	$(VENV)/bin/repa encoders fit-rae-decoder --dino $(TINY)/dino-reg --out $(TINY)/rae-decoder \
		--source '$(DEMO_DATA)/cc12m-train-{0000..0003}.tar'
	touch $@

demo-assets: $(DEMO_DATA)/.done $(TINY)/.done

encode: $(STAMP) $(ENCODE_DEPS)
	$(LAUNCH) encode $(ENCODE_ARGS)

cache/demo/manifest.json:
	$(MAKE) encode PRESET=demo

# Alignment targets beside the demo cache's DINOv2. Every target must see the cache's token grid (the demo's
# 64 px crop gives a 4x4 grid; the tiny SigLIP, 32 px with 8 px patches, has it natively): tests/test_demo_presets.py
# runs these two commands against the demo geometry.
DEMO_CACHE ?= cache/demo
add-targets: $(STAMP) $(DEMO_CACHE)/manifest.json
	$(LAUNCH) encode --cache $(DEMO_CACHE) --add-target dino-reg --target-model $(TINY)/dino-reg --class-tokens
	$(LAUNCH) encode --cache $(DEMO_CACHE) --add-target siglip --target-model $(TINY)/siglip

train: $(STAMP) $(TRAIN_DEPS)
	$(LAUNCH) train $(TRAIN_ARGS)

sample: $(STAMP)
	$(LAUNCH) sample $(SAMPLE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS); rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" && rc=0; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests $(ARGS); rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" && rc=0; exit $$rc

bench-encode: $(STAMP)
	$(PY) bench/encode.py $(ARGS)

bench-reader: $(STAMP)
	$(PY) bench/reader.py $(ARGS)

bench-train: $(STAMP)
	$(PY) bench/train.py $(ARGS)

bench-scale: $(STAMP)
	$(PY) bench/scale.py $(ARGS)

docs: $(STAMP)
	$(PY) -m pipeline.docs --write
	$(PY) -m pipeline.planning --write

clean:
	rm -rf cache/demo runs/demo samples/demo runs/rae-demo samples/rae-demo $(DEMO_DATA) $(TINY) bench/out

# make sweep: the demo ablation (configs/sweep-demo.toml, 6 runs) over the demo cache, encoded first if
# missing; make report: its comparison table and runs/sweep-demo/report.png. SWEEP=FILE SWEEP_OUT=DIR for others.
SWEEP ?= configs/sweep-demo.toml
SWEEP_OUT ?= runs/sweep-demo
.PHONY: sweep report

sweep: $(STAMP) $(if $(filter configs/sweep-demo.toml configs/sweep-methods.toml,$(SWEEP)),cache/demo/manifest.json) \
	$(if $(filter configs/sweep-targets.toml,$(SWEEP)),add-targets)
	$(VENV)/bin/repa sweep $(SWEEP) $(ARGS)

report: $(STAMP)
	$(VENV)/bin/repa report $(SWEEP_OUT) $(ARGS)
