#!/usr/bin/env bash
# Wheels for `python -m scripts.gpu_bench` on a bare GPU box (Python 3.12, x86-64, torch,
# transformers, accelerate, safetensors, numpy and pillow already there, no registry):
# diffusers at the version this checkout runs, and its own needs that such a box may lack.
# Each is fetched --no-deps at the version installed here, so the box gets exactly what the
# CPU tests ran against, and one version of each (two of one name stop the whole install).
#
#     scripts/gpu_wheels.sh            # into wheels/ (gitignored: carry it with the call)
#     PYTHON=python3 WHEELS=dir scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
dest=${WHEELS:-wheels}

# diffusers' Requires-Dist beyond what the box has for sure. importlib_metadata (with zipp
# and lazy-importer, its own needs) is the one the GPU image is known to lack; requests,
# filelock and regex are there today but cost little, so the bench does not hang on the
# image's next change. huggingface_hub (>=1.32), safetensors (>=0.8), numpy and pillow come
# with the image (1.33 and 0.8.0 as last read).
packages=(diffusers importlib_metadata zipp lazy-importer requests filelock regex)

# 1. Pin each to the version installed here (the venv the CPU tests use).
pins=()
for name in "${packages[@]}"; do
  version=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" \
            "$name") || { echo "gpu_wheels: $name is not installed in $python" >&2; exit 1; }
  pins+=("$name==$version")
done

# 2. Python 3.12 manylinux x86-64 wheels only (regex is compiled; the rest are pure Python).
#    pip matches manylinux_2_N exactly, hence the list.
rm -rf "$dest"
mkdir -p "$dest"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d "$dest" "${pins[@]}"

# 3. What came, and the command that runs the bench there. --target keeps the box's own
#    environment as it is; the checkout's root is on the path through `-m`.
ls -l "$dest"
echo "total: $(du -ch "$dest"/*.whl | tail -1 | cut -f1) (the device carries at most 64 MiB)"
cat <<CMD

device command (carry: ["$dest"]):
set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $dest/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && nvidia-smi -L && python3 -m scripts.gpu_bench --json \$OUT/gpu_bench.json 2>&1 | tee \$OUT/gpu_bench.log
CMD
