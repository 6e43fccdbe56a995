#!/usr/bin/env bash
# The GPU checks in as few device calls as possible, from the repository root:
#
#   bash benchmarks/gpu_session.sh tests   # the Triton kernels' tests on CUDA tensors
#   bash benchmarks/gpu_session.sh bench   # benchmarks/bench_cuda.py, every case
#   bash benchmarks/gpu_session.sh fold    # fold() on the GPU (bench_family.py --device cuda)
#   bash benchmarks/gpu_session.sh all     # the three in a row
#
# Runs from the source tree (PYTHONPATH=src) with the machine's own torch and triton,
# so nothing is installed. Logs, CSV and JSON go to $OUT when it is set (the device
# tool's output folder), else to benchmarks/results/gpu. Each stage is independent:
# one that fails is reported and the next one still runs.
set -uo pipefail

out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0

environment() {
    {
        date -u +%FT%TZ
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        "$py" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, "SMs")'
        git rev-parse --short HEAD 2>/dev/null || true
    } >"$out/environment.txt" 2>&1
    cat "$out/environment.txt"
}

run_tests() {
    # tests/conftest.py leaves TRITON_INTERPRET unset when CUDA is available, so these
    # run the compiled kernels on the GPU against the float64 reference.
    "$py" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_act_fused.py \
        2>&1 | tee "$out/tests.log" | tail -40 || status=1
}

run_bench() {
    "$py" benchmarks/bench_cuda.py --out "$out" 2>&1 | tee "$out/bench_cuda.log" || status=1
}

run_fold() {
    "$py" benchmarks/bench_family.py --fold-only --device cuda --fold-batch 256 \
        --repeats 30 --out "$out" 2>&1 | tee "$out/fold.log" || status=1
}

environment
case "${1:-all}" in
    tests) run_tests ;;
    bench) run_bench ;;
    fold) run_fold ;;
    all) run_tests; run_bench; run_fold ;;
    *) echo "usage: $0 tests|bench|fold|all" >&2; exit 2 ;;
esac
exit $status
