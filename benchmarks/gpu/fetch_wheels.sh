#!/usr/bin/env bash
# Download, on a machine that reaches the package registries, the wheels that the lent GPU machine lacks
# (its image has PyTorch, NumPy, SciPy, scikit-learn, safetensors, rich, pytest, but not the packages
# below) into .whl/ at the repository root (ignored by git), for Python 3.12 on x86-64 Linux.
# The versions are this machine's installed ones, so both sides run the same code.
#
#     benchmarks/gpu/fetch_wheels.sh     # then carry ".whl" and ".gpu_data" with benchmarks/gpu/check.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .whl && mkdir .whl
version() { python -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'; }
pure="opacus diffusers importlib-metadata zipp medmnist fire termcolor kymatio appdirs configparser pydicom opt-einsum pycparser"
binary="cryptography cffi pynacl"
for name in $pure $binary; do
    v=$(version "$name"); [ -n "$v" ] || { echo "fetch_wheels: $name is not installed here; install the project first" >&2; exit 1; }
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "$name==$v"
done
# The MedMNIST files the GPU demo reads (../shared does not travel to the device machine).
rm -rf .gpu_data && mkdir .gpu_data && cp "${SECURE_ONESHOT_DATA:-../shared/data/medmnist}"/*.npz .gpu_data/
du -sh .whl .gpu_data
