#!/usr/bin/env bash
# The wheels the GPU image lacks (it has torch, transformers, Triton, accelerate, numba, pyarrow and
# cuDNN, but no network): fetched here into .whl/ (git-ignored) for the image's CPython 3.12, then
# carried with the device call (`carry: [".whl"]`, <= 64 MiB) and installed by scripts/gpu_session.sh.
# Versions pinned to what the suite is tested with; datasets 4.7 needs dill < 0.4.1, multiprocess < 0.70.19.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
platforms=(--platform any --platform manylinux1_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    nvidia-cudnn-frontend==1.32.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 trl==1.16.0 \
    flash-linear-attention==0.6.0 fla-core==0.6.0
du -sh .whl
