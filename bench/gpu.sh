#!/usr/bin/env bash
# One prepared GPU run (under 8 minutes on one recent GPU): the checks only a GPU can confirm
# (device crops, nvjpeg decode vs OpenCV and its ms per image, CUDA graphs, fp16), raw crops/s
# per batch size (fp32/fp16, eager and CUDA graphs), then the service's throughput and latency on
# the GPU against the best raw configuration; the load sends JPEGs, so with jpeg_decode=auto
# (the default) they are decoded on the GPU. Run from the repository root:
#     bash bench/gpu.sh [CONFIG]
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-coco-w48-256x192}
PY=${PYTHON:-.venv/bin/python}
export YOLO_OFFLINE=1 PYTHONPATH=$PWD
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 240 "$PY" bench/gpu_check.py --config "$CONFIG" --seconds 2 || status=1
for precision in fp32 auto; do
  echo; echo "=== service on cuda, precision $precision, $CONFIG, 4 boxes/image, flip on"
  timeout 150 "$PY" bench/load.py --start-server --device cuda --config "$CONFIG" \
      --precision "$precision" --persons 4 --levels 1 4 16 --transports rest grpc \
      --duration 6 --raw-duration 2 --busy-level 0 --max-batch-size 32 || status=1
done
exit $status
