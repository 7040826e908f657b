#!/usr/bin/env bash
# One call on a GPU machine: build fastloss with its CUDA sources, run the GPU tests, then the GPU benchmark sweep
# (the issue's target shapes first), all inside one time budget, leaving every log and record under $OUT.
#
#   OUT=/some/dir bash scripts/gpu_check.sh        # from the repository root; prints a short summary last
#
# Budget: GPU_CHECK_BUDGET_S (default 540 s) for the whole script; the build gets at most GPU_CHECK_BUILD_S (240),
# the tests at most GPU_CHECK_TESTS_S (150), the sweep what is left (its cases stop starting 20 s before the end;
# the records are saved after every case). Wheels of optional peers (inf-cl, cut-cross-entropy) in ./.whl are
# installed first when present: fetch them here with `bash scripts/gpu_check.sh --fetch-wheels` and name `.whl` in the
# device call's carry list. GPU_CHECK_DRY=1 runs the same steps on the CPU at tiny shapes, without the build,
# to check the plumbing where there is no GPU.
set -u -o pipefail
if [ "${1:-}" = --fetch-wheels ]; then  # pure-Python wheels; their needs (torch, triton, numpy) are on the GPU image
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .whl "inf-cl==1.2.1" "cut-cross-entropy==25.1.1"
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fastloss-gpu-check}
mkdir -p "$OUT"
budget=${GPU_CHECK_BUDGET_S:-540}
end=$((SECONDS + budget))
left() { echo $((end - SECONDS)); }
cap() { local want=$1 rest; rest=$(left); echo $((want < rest ? want : rest)); }
summary=()

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  summary+=("wheels: $(ls .whl | tr '\n' ' ')")
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
} | tee "$OUT/machine.txt"

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  where=(--cpu --quick)
  summary+=("build: skipped (dry run)")
else
  where=(--gpu)
  t=$(cap "${GPU_CHECK_BUILD_S:-240}")
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FASTLOSS_EXT_STRICT=1 \
    timeout "$t" python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1
  rc=$?
  info=$(python3 -c "import fastloss._C as c; print(c.build_info())" 2>&1 | tail -1)
  summary+=("build: rc=$rc in ${t}s cap; fastloss._C $info")
fi

# the gpu-marked tests, then the benchmark wrappers (tiny shapes, every impl checked against sentence-transformers
# on this device, inf-cl and cut-cross-entropy included when their wheels came along)
t=$(cap "${GPU_CHECK_TESTS_S:-150}")
select=(-m gpu tests)
[ "${GPU_CHECK_DRY:-0}" = 1 ] && select=(-k "test_cli_saves" benchmarks)
timeout "$t" python3 -m pytest -q -p no:cacheprovider "${select[@]}" >"$OUT/tests.log" 2>&1
summary+=("tests (${select[*]}): rc=$? $(tail -1 "$OUT/tests.log")")
t=$(cap 60)
timeout "$t" python3 -m pytest -q -p no:cacheprovider benchmarks/test_benchmarks.py >>"$OUT/tests.log" 2>&1
summary+=("tests (benchmarks/test_benchmarks.py): rc=$? $(tail -1 "$OUT/tests.log")")

for groups in target batch,dim,dtype,flat; do
  rest=$(($(left) - 20))
  if [ "$rest" -le 90 ]; then
    summary+=("bench --groups $groups: not started, $(left) s left")
    continue
  fi
  timeout "$rest" python3 -m benchmarks "${where[@]}" --groups "$groups" --no-plot --no-max-batch --out "$OUT" \
    --time-limit "$((rest - 60))" >>"$OUT/bench.log" 2>&1
  summary+=("bench --groups $groups: rc=$?")
done
rest=$(($(left) - 10))
if [ "${GPU_CHECK_DRY:-0}" != 1 ] && [ "$rest" -gt 60 ]; then
  timeout "$rest" python3 -m benchmarks --gpu --ops mnrl --impls fastloss --groups none --max-batch \
    --max-batch-limit "${GPU_CHECK_MAX_BATCH:-1048576}" --no-plot --out "$OUT" >>"$OUT/bench.log" 2>&1
  summary+=("max-batch search: rc=$?")
fi

# fp32 MNRL with tf32x3 tensor-core dots (FASTLOSS_FP32_DOT), to weigh against the default ieee records above; its
# own folder, since the record schema has no precision field (the loss is still checked against the reference)
rest=$(($(left) - 10))
if [ "${GPU_CHECK_DRY:-0}" != 1 ] && [ "$rest" -gt 60 ]; then
  FASTLOSS_FP32_DOT=tf32x3 timeout "$rest" python3 -m benchmarks --gpu --ops mnrl --impls fastloss --dtypes fp32 \
    --groups dtype --no-plot --no-max-batch --out "$OUT/tf32x3" >>"$OUT/bench.log" 2>&1
  summary+=("bench mnrl fp32 FASTLOSS_FP32_DOT=tf32x3: rc=$?")
fi

grep -E "^(op|mnrl|mnsrl|cosent|angle|batch|gradcache|target|  )" "$OUT/bench.log" | tail -40
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
ls "$OUT"
