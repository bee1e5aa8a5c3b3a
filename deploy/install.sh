#!/usr/bin/env bash
# Set up cryodask in a virtual environment: deploy/install.sh [VENV] [EXTRAS]
#   VENV    where to create it (default .venv)
#   EXTRAS  comma-separated extras: dev, sam2, micrographs, crf, gpu, jobqueue (default none)
# torch is installed first, pinned to its CPU-compatible release, and every later install is
# constrained to it, so no extra can swap in a multi-GB CUDA build (see ENVIRONMENT notes).
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "cryodask needs Python >= 3.11" >&2; exit 2; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if [[ ",$extras," == *",sam2,"* || ",$extras," == *",micrographs,"* ]]; then
  echo "torch==2.13.0" > "$constraints"
  "${pip[@]}" torch==2.13.0
fi
if [[ ",$extras," == *",sam2,"* ]]; then
  # SAM2's build asks for torch; it has no compiled part we need (SAM2_BUILD_CUDA=0)
  "${pip[@]}" --no-deps hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 iopath==0.1.10 portalocker==4.4.2
  SAM2_BUILD_CUDA=0 "${pip[@]}" --no-deps --no-build-isolation sam2==1.1.0
fi
target="$here"
[ -n "$extras" ] && target="$here[$extras]"
"${pip[@]}" -c "$constraints" -e "$target"
if [[ ",$extras," == *",dev,"* ]]; then
  # copick's pydantic models (copick.models) validate cryodask's copick files in the tests; copick 1.x
  # pins zarr < 3, so it comes without its dependencies (its filesystem backend is tested in its own
  # environment, .venv-copick, that tests/test_copick.py makes)
  "${pip[@]}" --no-deps copick==1.31.0
fi
if [[ ",$extras," == *",napari,"* ]]; then
  # napari asks which reader to use for any folder unless its preferences name one: name cryodask
  # for its stores and picks files (a user's own earlier choice is kept)
  "$venv/bin/python" -m cryodask.napari
fi
if [[ -s "$constraints" ]]; then
  # nothing may have swapped torch, and torchvision (a CUDA build on PyPI) must stay out
  "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' \
    || { echo "torch was replaced; expected 2.13.0" >&2; exit 1; }
  "$venv/bin/python" -m pip uninstall -y -q torchvision 2>/dev/null || true
fi
echo "cryodask installed in $venv ($("$venv/bin/cryodask" --help >/dev/null && echo ok))"
