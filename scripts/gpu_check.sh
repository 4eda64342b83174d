#!/usr/bin/env bash
# The device checks for a lent GPU machine (see docs/benchmarks.md): CUDA capture tests,
# then bench_capture.py --device cuda. Wheels the image lacks travel in .whl/.
# Usage: bash scripts/gpu_check.sh OUT_DIR [TEST_SECONDS] [BENCH_SECONDS] [BENCH_ARGS...]
set -u
out=${1:?out dir}; tsec=${2:-180}; bsec=${3:-240}; shift 3 2>/dev/null || shift $#
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, zarr, transformers; print('torch', torch.__version__, 'zarr', zarr.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$out/env.txt"
timeout "$tsec" python3 -m pytest -q -p no:cacheprovider -x tests/capture/test_cuda.py \
  tests/capture/test_job.py tests/capture/test_hf_families.py tests/capture/test_generation.py \
  2>&1 | tee "$out/tests.txt" | tail -25
timeout "$bsec" python3 scripts/bench_capture.py --device cuda --markdown --json "$out/bench.json" "$@" \
  2>&1 | tee "$out/bench.txt" | tail -40
