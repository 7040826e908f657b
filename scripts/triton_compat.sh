#!/usr/bin/env bash
# Run the Triton kernels' tests (under TRITON_INTERPRET=1, on the CPU) against another Triton release, e.g. the 3.6 of
# the GPU image, without touching the installed one:  bash scripts/triton_compat.sh 3.6.0
# Triton 3.6's interpreter converts 1-element arrays to Python ints, which NumPy 2.4 (here) refuses and 2.2 allows,
# so an older NumPy goes into the same side folder. torch.compile tests are left out: inductor needs its own Triton.
set -euo pipefail
version=${1:?usage: scripts/triton_compat.sh TRITON_VERSION}
side=${TMPDIR:-/tmp}/fastloss-triton-$version
python3 -m pip install -q --disable-pip-version-check --no-deps --target "$side" "triton==$version" "numpy<2.3"
PYTHONPATH="$side" python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -k "not compile" \
  tests/test_sim_lse.py tests/test_mnrl.py tests/test_cosent.py tests/test_triplet.py tests/test_gradcache.py
