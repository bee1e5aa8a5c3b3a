#!/usr/bin/env bash
# The GPU check on a lent machine: install the wheels carried in .whl/ (made here by
# benchmarks/gpu_wheels.sh: dask, zarr, mrcfile, SAM2 ... for the machine's Python 3.12, 21 MB;
# ../.library/device/README.md), then run benchmarks/gpu.py into $OUT (or the current folder).
# Usage, from the device tool: run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
PYTHONUNBUFFERED=1 timeout 480 python3 benchmarks/gpu.py --out "${OUT:-.}/gpu.json" "$@"
