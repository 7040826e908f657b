#!/usr/bin/env bash
# Sets fastloss up in the current Python environment: torch (whatever 2.11..2.14 is there, else the newest allowed),
# the build tools, then the package itself, editable, with its native extension and the test/bench extras.
# Safe to run again: a second run with the same native sources and toolchain reuses the extension it built (setup.py's
# build cache, FASTLOSS_BUILD_CACHE); any change to them compiles it whole (pip builds in a fresh temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check 'torch>=2.11,<2.15' 'setuptools>=64' wheel 'pybind11>=2.12' ninja
"$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation -e '.[test,bench]'
"$PY" -c "import fastloss, fastloss._backend as b; print('fastloss', fastloss.__version__, '| native extension:', 'built' if b.native_module() is not None else 'not built (Python fallback)')"
