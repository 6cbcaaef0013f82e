#!/usr/bin/env bash
# Checks for a machine with a CUDA GPU (CI has none): the CUDA tests, a short translator
# benchmark trained and decoded on the GPU, then the whole suite, where device "auto" picks the
# GPU. Writes its logs and the benchmark's JSON to OUT_DIR. Usage: bash scripts/gpu_check.sh OUT_DIR
# (BENCH_ARGS: more options for the benchmark, e.g. "--max-tokens 16384"; SUITE_TIMEOUT: seconds, 400)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$out/gpu.txt"
echo "== CUDA tests"
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 \
  | tee "$out/cuda_tests.txt" | tail -40
echo "== translate benchmark on the GPU (--quick ${BENCH_ARGS:-})"
# shellcheck disable=SC2086
timeout 420 python3 bench/translate.py --quick --device cuda ${BENCH_ARGS:-} \
  >"$out/translate_gpu.json" 2>"$out/translate_gpu.err"
echo "rc $?"; tail -5 "$out/translate_gpu.err"; head -c 3000 "$out/translate_gpu.json"
echo "== whole suite"
timeout "${SUITE_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider --durations=10 2>&1 \
  | tee "$out/suite.txt" | tail -40
