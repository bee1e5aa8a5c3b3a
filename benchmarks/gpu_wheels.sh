#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, transformers, CuPy, numpy, scipy, pandas,
# scikit-image, psutil, typer, rich, but no dask, zarr, mrcfile, SAM2 ...), for its Python 3.12,
# into .whl/ (git-ignored through .git/info/exclude) for `device run --carry .whl`; gpu.sh
# installs them. Versions are the ones this project installs (deploy/install.sh).
# Usage: bash benchmarks/gpu_wheels.sh   (needs pip's network access; ~40 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl dask==2026.7.1 distributed==2026.7.1 dask-image==2026.5.0 dask-jobqueue==0.9.0 zarr==3.1.6 \
  numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 mrcfile==1.5.4 ome-zarr==0.18.0 \
  ome-zarr-models==1.7 starfile==0.5.13 connected-components-3d==4.1.1 hydra-core==1.3.8 omegaconf==2.3.1 \
  partd==1.4.2 locket==1.0.0 zict==3.0.0 tblib==3.2.2 \
  tornado==6.6.1 slicerator==1.1.0 pydantic==2.12.5 pydantic-core==2.41.5 pydantic-zarr==0.9.2 \
  typing-inspection==0.4.5 annotated-types==0.8.0 platformdirs==4.14.9 deprecated==1.3.1 dask-cuda==26.10.0
# source distributions, built here as pure-Python wheels; SAM2 with its CUDA extension off
# (as deploy/install.sh)
SAM2_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl sam2==1.1.0 \
  antlr4-python3-runtime==4.9.3 iopath==0.1.10 pims==0.7
du -sh .whl
