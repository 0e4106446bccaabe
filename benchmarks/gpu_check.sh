#!/usr/bin/env bash
# One prepared check of the CUDA path (under 5 minutes on one modern GPU): the CUDA-marked
# tests (every registry model and method, SDPA flash / efficient attention and the
# Transformer fast path, against the float64 CPU reference), NTKMonitor under Lightning's
# ModelParallelStrategy with FSDP2, the GPU benchmarks and the
# registry's method table on CUDA, written to
# ${OUT:-benchmarks/results}/gpu_check.txt. Never part of CI.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
log="$out/gpu_check.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "== environment"; date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  # the package's own dependencies besides torch, if this machine lacks them
  python3 -c "import pytest, pytorch_lightning, torchmetrics" 2>/dev/null \
    || python3 -m pip install -q pytest pytorch-lightning torchmetrics scikit-learn
  python3 -c "import transformers" 2>/dev/null || python3 -m pip install -q "transformers>=4.40"
  echo "== CUDA tests (every registry model and method against the float64 CPU reference)"
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" tests/test_cuda.py
  echo "== NTKMonitor under Lightning's ModelParallelStrategy (FSDP2, NCCL; two GPUs if present)"
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" \
    tests/test_callback_model_parallel.py -k cuda
  echo "== benchmarks"
  timeout 60 python3 benchmarks/bench_gpu.py
  echo "== registry on CUDA: auto against the fastest method and the recipe"
  timeout 60 python3 benchmarks/bench_methods.py --only registry --quick --repeats 3 --device cuda
} 2>&1 | tee "$log"
