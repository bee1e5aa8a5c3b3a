#!/usr/bin/env bash
# One machine with several GPUs: a Dask scheduler, one dask-cuda worker per GPU (each with the
# resource GPU=1, which cryodask's GPU tasks ask for), then one cryodask command against it.
#
#   deploy/local-multigpu.sh membranes zarr/ --out membranes/ --weights ~/weights --store-logits
#   CUDA_VISIBLE_DEVICES=0,2 deploy/local-multigpu.sh pick zarr/t1.zarr --out picks/ --method cryosam --prompt 60,200,310
#
# The cluster stays up only for that command. To run several commands on one cluster, start the
# same scheduler and workers by hand and pass --cluster tcp://127.0.0.1:$PORT to each.
# `cryodask ... --cluster cuda` is the one-line alternative (LocalCUDACluster, no RMM pool).
#
# Settings (environment):
#   CUDA_VISIBLE_DEVICES  GPUs to use, e.g. 0,1,2,3 (default: every GPU nvidia-smi lists)
#   PORT                  scheduler port (default 8786); the dashboard is on DASHBOARD (default 8787)
#   THREADS               threads per worker (default 4: reading and preprocessing beside the GPU)
#   MEMORY                host memory limit per worker (default auto: the machine's memory / workers)
#   RMM_POOL              RMM pool per GPU, a fraction or a size (default 0.8; empty: no pool).
#                         torch and cupy allocate from the pool, so they do not compete with it.
#   SCRATCH               node-local folder for spilling (default ${TMPDIR:-/tmp})
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,20p' "$0" >&2; exit 2; }

# nvidia-smi numbers GPUs by PCI bus, CUDA by speed unless told otherwise
export CUDA_DEVICE_ORDER=PCI_BUS_ID
if [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
  CUDA_VISIBLE_DEVICES=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
  export CUDA_VISIBLE_DEVICES
fi
IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
port=${PORT:-8786}
dashboard=${DASHBOARD:-8787}
address="tcp://127.0.0.1:$port"
scratch=${SCRATCH:-${TMPDIR:-/tmp}}
pool=(--rmm-pool-size "${RMM_POOL-0.8}" --set-rmm-allocator-for-libs torch,cupy)
[ -n "${RMM_POOL-0.8}" ] || pool=()

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

dask scheduler --host 127.0.0.1 --port "$port" --dashboard-address ":$dashboard" &
pids+=($!)
# one worker process per GPU in CUDA_VISIBLE_DEVICES, each pinned to its GPU by dask-cuda
dask cuda worker "$address" --nthreads "${THREADS:-4}" --memory-limit "${MEMORY:-auto}" \
  --resources "GPU=1" "${pool[@]}" --local-directory "$scratch" --death-timeout 60 &
pids+=($!)

python - "$address" "${#gpus[@]}" <<'PY'
import sys
from distributed import Client

with Client(sys.argv[1], timeout="60s") as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=300)
    print(f"{len(client.scheduler_info()['workers'])} GPU workers at {sys.argv[1]}, dashboard {client.dashboard_link}")
PY

cryodask "$@" --cluster "$address"
