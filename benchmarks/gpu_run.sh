#!/usr/bin/env bash
# The one script to run on a GPU machine without network: `bash benchmarks/gpu_run.sh [flags]`
# from the repository root. Extra flags go to `python -m benchmarks.gpu` (e.g. --max-batch-size 32).
#
# 1. Installs the wheels carried in .whl/ (transformers, grpcio, protobuf, ... that the machine
#    lacks or has too old; fetched beforehand with `pip download`, never here) into a temporary
#    directory put first on PYTHONPATH, with the repository after it.
# 2. Records nvidia-smi and the package versions.
# 3. Runs the benchmark (2B-sized model with RANDOM WEIGHTS, the five screenshot sizes, 3 runs,
#    1 / 8 / 32 callers with 4 requests each), stopped after BENCH_SECONDS (default 420) so the
#    whole script stays under ~8 minutes; the JSON is rewritten after each part, so a stopped run
#    still leaves what it measured, and the tables are then printed from it.
# Results go to $OUT (a fresh temporary directory when unset): gpu.json, gpu.md, gpu.log,
# nvidia-smi.txt, versions.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
BENCH_SECONDS="${BENCH_SECONDS:-420}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  SITE="$(mktemp -d)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD"
else
  echo "gpu_run.sh: no wheels in .whl/; using the machine's packages" >&2
  export PYTHONPATH="$PWD"
fi

nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" || true
python3 - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as md
import platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("transformers", "tokenizers", "safetensors", "huggingface-hub", "numpy", "numba", "pillow",
             "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "prometheus-client"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF

status=0
timeout --signal=INT --kill-after=30 "$BENCH_SECONDS" \
  python3 -m benchmarks.gpu --size 2b --runs 3 --callers 1 8 32 --requests 4 --level-seconds 60 \
    --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" "$@" 2>&1 | tee "$OUT/gpu.log" \
  || status=$?
if [ "$status" -ne 0 ] && [ -s "$OUT/gpu.json" ]; then
  echo "gpu_run.sh: the benchmark ended with status $status; the tables of what it measured:" >&2
  python3 -m benchmarks.gpu --report "$OUT/gpu.json" | tee "$OUT/gpu.md"
fi
echo "results in $OUT"
exit "$status"
