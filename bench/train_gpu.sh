#!/usr/bin/env bash
# Stage-two throughput on one GPU: SiT-XL/2 + REPA (bf16) fed from a synthetic SD-VAE/DINOv2-B-sized
# cache against the same step on a batch already in GPU memory: class-conditioned eager and compiled,
# then text-conditioned (T5-XXL-width int8 captions) compiled; 200 synchronised steps after warm-up each.
# The eager run also times each --method (sit, reg, irepa, dispersive, reg+irepa) in memory against REPA.
# Both class-conditioned runs also time RAE's DiTDH-XL in memory, diffusing the cache's 16x16x768 DINOv2-B
# tokens (--diffuse dino, RAE's ImageNet-256 shape), against the SiT-XL/2 without REPA (--no-dit-dh: skip).
# Needs the project installed (make install); about 15 minutes on an H100 including compilation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" bench/train.py --real "$@"
# BENCH_S3=s3://bucket/prefix (with AWS_* credentials and endpoint set): also cache-fed from object storage.
"$PY" bench/train.py --real --compile --methods "" ${BENCH_S3:+--s3 "$BENCH_S3"} "$@"
"$PY" bench/train.py --real --compile --cond text --methods "" "$@"
