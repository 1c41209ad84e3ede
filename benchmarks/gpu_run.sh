#!/usr/bin/env bash
# The one prepared script for a GPU machine without network, run from the repository root:
#
#     OUT=/results bash benchmarks/gpu_run.sh [benchmark or serve flags]   # on the GPU machine, <= ~9 min
#     bash benchmarks/gpu_run.sh --fetch-wheels                             # beforehand, where PyPI answers
#
# --fetch-wheels downloads into $WHEELS (.whl/, git-ignored; ~21 MB: carry it along with the checkout) the
# wheels such a machine lacks or has too old, for CPython $WHEEL_PYTHON (3.12) on manylinux x86_64:
# transformers $WHEEL_TRANSFORMERS (5.24.0: its dependencies are those that machine has; 5.25
# would also need huggingface-hub >= 2.4 and kernels), regex, and the grpcio / protobuf versions
# the committed stubs were generated with.
#
# On the GPU machine (each step's limit in brackets; the whole stays under ~9 minutes):
# 1. [s]   the wheels in $WHEELS/ go into a temporary directory first on PYTHONPATH, the checkout after it;
# 2. [s]   nvidia-smi, then `python -m benchmarks.gpu_preflight`: Python, every distribution with
#          pyproject's bounds (and what those need), torch with CUDA, transformers' Qwen3-VL, the
#          committed gRPC stubs, the service's imports, device memory and disk. Anything missing
#          is named and the script stops (status 3) before the long run;
# 3. [BENCH_SECONDS, 450] `python -m benchmarks.gpu`: the 2B-sized model with RANDOM WEIGHTS, five
#          screenshot sizes x 3 runs, Ground per size, then 1 / 8 / 32 callers x 16 requests; stopped
#          with SIGINT at the limit (the JSON is rewritten after each part, and the tables are then
#          printed from what it holds).
# Results in $OUT (a fresh temporary directory when unset): preflight.txt, nvidia-smi.txt, gpu.log,
# gpu.json, gpu.md. Exit status: the benchmark's (3: preflight failed, 124/130: stopped at the limit).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.whl}"

if [ "${1:-}" = "--fetch-wheels" ]; then
  platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  python3 -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp "${platforms[@]}" -d "$WHEELS" \
    "transformers==${WHEEL_TRANSFORMERS:-5.24.0}" "regex>=2025.10.22" grpcio==1.85.1 \
    grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.35.1 "redis>=5.0"
  du -sh "$WHEELS"
  exit 0
fi

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
BENCH_SECONDS="${BENCH_SECONDS:-450}"
export PYTHONUNBUFFERED=1

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="$(mktemp -d)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PWD"
else
  echo "gpu_run.sh: no wheels in $WHEELS/; using the machine's packages" >&2
  export PYTHONPATH="$PWD"
fi

nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" || true
status=0
timeout 120 python3 -m benchmarks.gpu_preflight 2>&1 | tee "$OUT/preflight.txt" || status=$?
if [ "$status" -ne 0 ]; then
  echo "gpu_run.sh: preflight failed (status $status): fix what it names above, then run again" >&2
  exit 3
fi

timeout --signal=INT --kill-after=30 "$BENCH_SECONDS" \
  python3 -m benchmarks.gpu --size 2b --runs 3 --callers 1 8 32 --requests 16 --level-seconds 45 \
    --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" "$@" 2>&1 | tee "$OUT/gpu.log" \
  || status=$?
if [ "$status" -ne 0 ] && [ -s "$OUT/gpu.json" ]; then
  echo "gpu_run.sh: the benchmark ended with status $status; the tables of what it measured:" >&2
  python3 -m benchmarks.gpu --report "$OUT/gpu.json" | tee "$OUT/gpu.md"
fi
echo "results in $OUT"
exit "$status"
