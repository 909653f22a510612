#!/usr/bin/env bash
# Stage-one throughput on one GPU: SD-VAE + DINOv2-B architectures (random init), 256 px, synthetic
# 500x375 JPEG shards, torch.compile, bf16. Prints encoders-alone and end-to-end img/s and their ratio.
# Needs the project installed (make install); about 3-4 minutes on an H100 including compilation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" bench/encode.py --real "$@"
