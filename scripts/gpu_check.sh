#!/usr/bin/env bash
# The device checks for a lent GPU machine (docs/benchmarks.md): the capture tests (CUDA
# ones included), then bench_long.py and bench_capture.py on cuda. Wheels the machine's
# image lacks travel in .whl/ (see /work/.library/device/README.md).
# Usage: bash scripts/gpu_check.sh OUT_DIR [TEST_S] [LONG_S] [CAPTURE_S]  (0 skips a step)
set -u
out=${1:?out dir}; tsec=${2:-180}; lsec=${3:-150}; csec=${4:-0}
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
if [ "$tsec" != 0 ]; then
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
  timeout "$tsec" python3 -m pytest -q -p no:cacheprovider $xdist -rs ${GPU_TESTS:-tests/capture} \
    2>&1 | tee "$out/tests.txt" | tail -30
  timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/capture/test_cuda.py -k 16k \
    2>&1 | grep -E "16k|passed|failed" | tee -a "$out/tests.txt"
fi
if [ "$lsec" != 0 ]; then
  timeout "$lsec" python3 scripts/bench_long.py --device cuda --markdown --json "$out/long.json" \
    2>&1 | tee "$out/long.txt" | tail -40
fi
if [ "$csec" != 0 ]; then
  timeout "$csec" python3 scripts/bench_capture.py --device cuda --markdown --repeats 2 \
    --json "$out/bench.json" 2>&1 | tee "$out/bench.txt" | tail -30
fi
