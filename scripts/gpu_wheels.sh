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
download() {  # download FOLDER SPEC...
    local folder=$1; shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$folder" "$@"
}
# every stage: cuDNN's frontend, datasets (and its pinned dill / multiprocess), TRL
download .whl nvidia-cudnn-frontend==1.32.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 trl==1.16.0
# hybrid-fast only: fla's kernels (kept apart: once importable, transformers routes every method to them)
download .whl/fla fla-core==0.6.0 einops==0.8.2
# hybrid-fast only: transformers 5.25 and kernels 0.19.1 (per-instance kernel functions) with what they
# need beyond the image's packages
download .whl/fast transformers==5.25.0 kernels==0.19.1 huggingface_hub==2.4.0 tokenizers==0.23.3 \
    safetensors==0.8.0 tomlkit "click>=8.4.2" "hf-xet>=1.6,<2" "regex>=2025.10.22" httpx2==2.17.0 \
    httpcore2==2.17.0 "truststore>=0.10" "idna>=3.18" "anyio>=4.10"
du -sh .whl
