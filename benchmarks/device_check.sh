#!/usr/bin/env bash
# The GPU session's checks in one call (device machine: python3 holds CUDA torch and triton).
#   kernel tests (GPU vs CPU logits, CUDA-graph replay), the sm_90 build report, then
#   benchmarks/engine_gpu.py per published model. Logs go to $OUT when it is set.
set -u
OUT=${OUT:-/tmp/device_check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout "${TEST_S:-180}" python3 -m pytest -q -ra --durations=6 -p no:cacheprovider \
    ${TESTS:-tests/test_kernels.py tests/test_kernels_sm90.py tests/test_gpu_benchmark.py} >"$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|error|FAILED|ERROR|SKIPPED" "$OUT/tests.log" | tail -25
for model in ${MODELS:-nano-9b-v2 nano-30b-a3b}; do
    timeout "${BENCH_S:-150}" python3 benchmarks/engine_gpu.py --models "$model" ${BENCH_ARGS:-} >"$OUT/bench-$model.log" 2>&1
    echo "bench $model exit $?"; tail -15 "$OUT/bench-$model.log"
done
