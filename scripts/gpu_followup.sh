#!/usr/bin/env bash
# A short second device call after scripts/gpu_check.sh: the questions its first run left (2026-11-29, H200), and
# since 3ac9dc9 / 586fcc7 / 601799d (fewer launches: 29 per row block instead of 89, 53 per small flash call instead
# of 79, counted on fake tensors) whether steps 2-4 now show small batches and 256 MiB blocks faster.
#
#   OUT=/some/dir bash scripts/gpu_followup.sh      # from the repository root; GPU_FOLLOWUP_BUDGET_S (default 250 s)
#
# 1. The gpu-marked Triton tests, stopped with SIGINT at their time limit so that pytest still prints the names and
#    reasons of the failures so far (scripts/gpu_check.sh's first run timed them out with SIGTERM: dots only). With
#    GPU_FOLLOWUP_ALL_TESTS=1 instead the whole suite but the slow tests: also the ~670 tests outside the gpu marker
#    that run on CUDA tensors on a GPU (test_triplet.py's generic tests, test_sim_lse.py, test_l2norm.py, ...), never
#    run on one yet; for a lease with the time (raise GPU_FOLLOWUP_BUDGET_S and GPU_FOLLOWUP_TESTS_S, the tests' share
#    of it, default 100 s).
# 2. Flash (Triton) against row-block (cuBLAS) MNRL, MNSRL and GTE over the batch sweep with sentence-transformers
#    and the GEMM floor (at the target the row-block op ran 4.8x faster than the flash one): which should be the
#    default on CUDA, and from which size (the 2026-11-29 run, at 30fe787, timed impl fastloss, then the flash kernels;
#    since f0cf712 fastloss_flash names them).
# 3. The row-block op at the target with a 256 MiB logits block instead of 1024: its time against its memory.
# 4. A profile of one small fwd+bwd per path (B=1024, D=768 bf16): the first run measured ~3 ms for shapes whose
#    GEMMs take microseconds.
# Everything goes under $OUT; the summary is printed last. GPU_CHECK_DRY=1 runs it on the CPU at tiny shapes.
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fastloss-gpu-followup}
mkdir -p "$OUT"
dry=${GPU_CHECK_DRY:-0}
end=$((SECONDS + ${GPU_FOLLOWUP_BUDGET_S:-250}))
cap() { local rest=$((end - SECONDS)); echo $(($1 < rest ? $1 : rest)); }
summary=()
note() { summary+=("[$((SECONDS))s] $*"); echo "gpu_followup: $*"; }

if [ "$dry" = 1 ]; then
  where=(--cpu --quick)
  tests=(-k "test_cli_saves" benchmarks)
else
  where=(--gpu)
  FASTLOSS_BUILD_EXT=0 timeout "$(cap 60)" python3 -m pip install -q --no-deps --no-build-isolation -e . \
    >"$OUT/install.log" 2>&1
  note "install without the extension: rc=$?"
  tests=(-m gpu --ignore tests/test_cuda_kernels.py --ignore tests/test_native.py --ignore tests/test_triplet_bwd_native.py
    tests)
  [ "${GPU_FOLLOWUP_ALL_TESTS:-0}" = 1 ] && tests=(-m "not slow" tests)
fi

xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n "${GPU_FOLLOWUP_WORKERS:-16}")
FASTLOSS_AUTOTUNE=first timeout -s INT -k 15 "$(cap "${GPU_FOLLOWUP_TESTS_S:-100}")" python3 -m pytest -q -p no:cacheprovider -rfE --durations=15 "${xdist[@]}" \
  "${tests[@]}" >"$OUT/tests.log" 2>&1
note "tests (${xdist[*]} ${tests[*]}): rc=$? $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"

bench=(python3 -m benchmarks "${where[@]}" --no-plot --no-max-batch --modes fwd+bwd)
t=$(cap 90)
if [ "$t" -gt 30 ]; then
  timeout "$t" "${bench[@]}" --ops mnrl,mnsrl,gte --groups batch \
    --impls fastloss_flash,fastloss_blocked,sentence_transformers,gemm_floor --time-limit "$((t - 25))" --out "$OUT" \
    >"$OUT/bench.log" 2>&1
  note "bench mnrl,mnsrl,gte batch (flash, row-block, ST, floor): rc=$?"
fi

t=$(cap 30)
if [ "$dry" != 1 ] && [ "$t" -gt 15 ]; then
  FASTLOSS_MNRL_BLOCK_MIB=256 timeout "$t" "${bench[@]}" --ops mnrl --impls fastloss_blocked --groups target \
    --out "$OUT/variants" >>"$OUT/bench.log" 2>&1
  note "bench mnrl target row-block FASTLOSS_MNRL_BLOCK_MIB=256: rc=$?"
fi

t=$(cap 30)
if [ "$t" -gt 10 ]; then
  timeout "$t" python3 - "$dry" >"$OUT/profile.log" 2>&1 <<'EOF'
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.cases import OPS

dry = sys.argv[1] == "1"
device = torch.device("cpu" if dry else "cuda")
B, D, dtype = (64, 32, torch.float32) if dry else (1024, 768, torch.bfloat16)
spec = OPS["mnrl"]
for impl in ("fastloss_flash", "fastloss_blocked", "sentence_transformers"):
    p = spec.make(B, 2 * B, D, dtype, device, 0)
    run = spec.impls[impl](p)
    def step():
        for x in p.inputs:
            x.grad = None
        run.fn().backward()

    for _ in range(3):
        step()
    if not dry:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([] if dry else [ProfilerActivity.CUDA])
    with profile(activities=acts) as prof:
        for _ in range(5):
            step()
        if not dry:
            torch.cuda.synchronize()
    print(f"=== {impl} [{run.backend}] B={B} N={2 * B} D={D} {dtype}, 5 fwd+bwd calls")
    key = "self_cpu_time_total" if dry else "self_cuda_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
EOF
  note "profile B=1024 D=768: rc=$?"
fi

grep -E "^(op|mnrl|mnsrl|gte)  " "$OUT/bench.log" | tail -40
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-220
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
ls "$OUT"
