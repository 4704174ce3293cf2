#!/usr/bin/env bash
# Device wrapper of benchmarks/gpu_suite.py: the whole GPU suite in one call, results in $OUT.
#   device run:  bash benchmarks/gpu_suite.sh            (timeout_s ~540: the suite stops itself at 450 s)
#   extra arguments go to the suite, e.g. --budget-s 300
# Writes $OUT/{suite,probe,w4a16,bcq,rope,decode}.json as it goes and $OUT/suite.log (7 files; the
# device returns at most 8).
set -o pipefail
: "${OUT:?set OUT to the results folder}"
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null || true
  "$PY" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/suite.log"
"$PY" -m benchmarks.gpu_suite --out "$OUT" "$@" 2>&1 | tee -a "$OUT/suite.log"
