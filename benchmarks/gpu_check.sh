#!/usr/bin/env bash
# The GPU check of issue 15, as ONE script for a CUDA machine (minutes there are counted):
#
#   benchmarks/gpu_check.sh [OUTDIR]      # default: $OUT if set (the device tool), else /tmp/gpu-check
#
# 1. versions (nvidia-smi, torch, triton);
# 2. the CUDA correctness tests: the token-exact tests against transformers on cuda with the
#    torch and Triton backends, CUDA graphs on and off (fp32, TF32 off), and the Triton kernel
#    tests (FLEETSERVE_TEST_CUDA_ONLY=1: the CPU cases skip, the C++ kernel is not built);
# 3. the Triton attention kernel vs the torch reference (benchmarks/gpu_bench.py kernel);
# 4. decode throughput of a random ~100M Llama, CUDA graphs on and off (gpu_bench.py engine);
# 5. a short table, last. Full logs and JSON in OUTDIR.
# TUNE=1: first sweep the kernel's launch shapes (gpu_bench.py tune) and measure 3-4 with the
# best; SKIP_TESTS=1: no step 2.
# Python: python3 (the CUDA image's, with torch and triton); PYTHON overrides.
set -u
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-/tmp/gpu-check}}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T_TESTS=${T_TESTS:-200}
T_KERNEL=${T_KERNEL:-90}
T_ENGINE=${T_ENGINE:-200}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$DIR/versions.txt"

TUNING=()
if [ "${TUNE:-0}" = 1 ]; then
  echo "== tune (timeout ${T_TUNE:-150}s)"
  timeout "${T_TUNE:-150}" $PY benchmarks/gpu_bench.py tune --out "$DIR/tune.json" >"$DIR/tune.log" 2>&1
  echo "tune exit $?" >>"$DIR/tune.log"
  grep -v '^  ' "$DIR/tune.log" | cut -c1-400
  TUNING=(--tuning "$DIR/tune.json")
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
echo "== tests (timeout ${T_TESTS}s)"
FLEETSERVE_TEST_CUDA_ONLY=1 timeout "$T_TESTS" $PY -m pytest -q -p no:cacheprovider -rs \
  tests/test_attention_triton.py tests/test_models.py tests/test_engine.py \
  tests/test_device.py tests/test_registry.py >"$DIR/pytest.log" 2>&1
echo "pytest exit $?" >>"$DIR/pytest.log"
tail -n 25 "$DIR/pytest.log"
fi

echo "== kernel (timeout ${T_KERNEL}s)"
timeout "$T_KERNEL" $PY benchmarks/gpu_bench.py kernel "${TUNING[@]}" --out "$DIR/kernel.json" >"$DIR/kernel.log" 2>&1
echo "kernel exit $?" >>"$DIR/kernel.log"
tail -n 3 "$DIR/kernel.log"

echo "== engine (timeout ${T_ENGINE}s)"
timeout "$T_ENGINE" $PY benchmarks/gpu_bench.py engine "${TUNING[@]}" --out "$DIR/engine.json" >"$DIR/engine.log" 2>&1
echo "engine exit $?" >>"$DIR/engine.log"
grep -v '^{' "$DIR/engine.log" | tail -n 8

echo "== summary"
[ -f "$DIR/pytest.log" ] && grep -h "passed\|failed\|error" "$DIR/pytest.log" | tail -n 2
$PY benchmarks/gpu_bench.py summary "$DIR"
