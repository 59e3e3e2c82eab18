#!/usr/bin/env bash
# Wheels of the Python packages the GPU acceptance machine lacks (or has at another version than this
# project is tested with), for Python 3.12 on x86-64, into .whl/ (git-ignored). gpu_check.sh installs
# them first when .whl/ exists; the device call names .whl in `carry`.
#
#   bash benchmarks/gpu_wheels.sh                 # submitit, timm and tensorboard at this environment's versions
#   bash benchmarks/gpu_wheels.sh av==14.0.1      # others, NAME or NAME==VERSION
set -euo pipefail
cd "$(dirname "$0")/.."
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=(submitit timm tensorboard)
rm -rf .whl
mkdir -p .whl
for spec in "${packages[@]}"; do
    if [[ "$spec" != *==* ]]; then   # the version this environment has, so the GPU run tests what CI tests
        version=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$spec" 2>/dev/null || true)
        [ -n "$version" ] && spec="$spec==$version"
    fi
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec"
done
ls -l .whl
du -sh .whl
