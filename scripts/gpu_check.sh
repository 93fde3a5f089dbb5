#!/usr/bin/env bash
# The GPU check, for a session lent a GPU machine (see ../shared/gpu.md): under 5 minutes, a table
# printed last, details in $OUT/gpu_check.json. That machine has PyTorch but no Ray: carry it.
#
#   here, once:   ../shared/gpu/carry-ray.sh                (writes .carry/, git-ignored)
#   device call:  run(command="bash scripts/gpu_check.sh", carry=[".carry"], timeout_s=420)
#   anywhere:     bash scripts/gpu_check.sh --dry           (the same steps, tiny, on CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
if [ -d .carry ] && ! python3 -c "import ray" 2>/dev/null; then
  python3 -m zipfile -e .carry/ray-slim.zip /tmp/site
  for w in .carry/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done
  chmod -R u+x /tmp/site/ray/core
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
"$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT.log"
