#!/usr/bin/env bash
# GPU figures for the README: the real SDXL-Turbo architecture with random weights,
# fp16, 512x512, 1 step; the pipeline alone per batch size, then through the HTTP server.
# Run from the checkout on a CUDA machine with the package installed (pip install -e .[gpu]).
set -euo pipefail
spillway=${SPILLWAY:-spillway}
"$spillway" weights random-full sdxl-turbo
"$spillway" bench --sweep "${BATCH_SIZES:-1,4,8,16,32}" --size 512x512 --steps 1
"$spillway" bench --size 512x512 --steps 1 --clients "${CLIENTS:-32}" --requests "${REQUESTS:-512}"
