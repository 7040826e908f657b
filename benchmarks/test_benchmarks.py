"""pytest-benchmark wrappers of the suite's cases, at tiny shapes: ``pytest benchmarks/``.

Each test checks its implementation against sentence-transformers (fp64) first, then times one fwd+bwd with the
``benchmark`` fixture (``--benchmark-json`` etc. work as usual). Use ``python -m benchmarks`` for real numbers.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import OPS, Skip, op_available
from benchmarks.runner import ORACLE, Checker, Options
from benchmarks.suites import Case

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
SHAPES = {"mnrl": (64, 128), "mnsrl": (64, 64), "gradcache_step": (128, 256)}
PARAMS = [
    pytest.param(op, impl, id=f"{op}-{impl}")
    for op, spec in OPS.items()
    for impl in spec.impls
    if impl in ("fastloss", ORACLE, "gemm_floor", "inf_cl", "cce_exact")
]


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker(Options(device=DEVICE, log=lambda _msg: None))


@pytest.mark.parametrize("op, impl", PARAMS)
def test_fwd_bwd(benchmark, checker, op, impl):
    missing = op_available(op, DEVICE)
    if missing:
        pytest.skip(missing)
    spec = OPS[op]
    B, N = SHAPES.get(op, (64, 64))
    case = Case(op, B, N, 32, "fp32", (impl,))
    try:
        p = spec.make(B, N, 32, torch.float32, DEVICE, 0)
        run = spec.impls[impl](p)
    except Skip as exc:
        pytest.skip(str(exc))
    if run.is_loss and impl != ORACLE:
        result = checker.check(spec, impl, case)
        assert result["ok"], f"{op}/{impl} does not match sentence-transformers: {result}"
    benchmark.extra_info.update(backend=run.backend, B=B, N=N, D=32, dtype="fp32")

    def step():
        for x in p.inputs:
            x.grad = None
        run.fn().backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
