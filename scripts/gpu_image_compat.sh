#!/usr/bin/env bash
# Run the whole suite against the GPU image's releases (torch 2.11, Triton 3.6, sentence-transformers 6.0.1; CPU
# only: the kernels under TRITON_INTERPRET=1) without touching this machine's environment: a venv and a clone of
# HEAD under ${TMPDIR:-/tmp}, the extension built in the clone against torch 2.11's headers (its CUDA sources too,
# where nvcc exists), then `pytest -q` there. So a device session does not find out on the device that the code
# needs a newer torch or Triton. About 7 minutes on 2 cores once Triton's cache holds the sm_90 compiles; from nothing
# 28 minutes (~4 GB of downloads and the build 6.6 minutes, the suite 21.4, most of it test_triton_aot compiling every
# kernel for sm_90 with that Triton: 4165 passed at 566ea20 on a 2-core Zen 4 EPYC, 2026-12-02).
#   bash scripts/gpu_image_compat.sh [TORCH TRITON SENTENCE_TRANSFORMERS]     (defaults: 2.11.0 3.6.0 6.0.1)
# This machine's pip caps torch at the release it holds (/etc/xdg/pip); the side venv ignores that config.
# Triton 3.6's interpreter converts 1-element arrays to Python ints, which NumPy >= 2.3 refuses: numpy<2.3 there.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_v=${1:-2.11.0} triton_v=${2:-3.6.0} st_v=${3:-6.0.1}
side=${TMPDIR:-/tmp}/fastloss-image-$torch_v-$triton_v-$st_v
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$side/venv/bin/python" ] || python3 -m venv "$side/venv"
py=$side/venv/bin/python
"$py" -m pip install -q "torch==$torch_v" "triton==$triton_v" "sentence-transformers==$st_v" "numpy<2.3" \
  'setuptools>=64' wheel 'pybind11>=2.12' ninja
rm -rf "$side/src" && git clone -q . "$side/src"
cd "$side/src"
"$py" -m pip install -q --no-build-isolation -e '.[test,bench]'
"$py" -c "import torch, triton, sentence_transformers as st, fastloss._backend as b; print('torch', torch.__version__,
'| triton', triton.__version__, '| sentence-transformers', st.__version__, '| extension', b.native_module())"
if command -v nvcc >/dev/null 2>&1; then export FASTLOSS_EXPECT_CUDA_BUILD=1; fi
"$py" -m pytest -q -p no:cacheprovider
