"""scripts/compare_backends.py, the randomised developer check of every backend against the fp64 reference: it runs,
reports, restores the environment, and no backend raises on the configurations it draws."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_backends.py"


def _load():
    spec = importlib.util.spec_from_file_location("compare_backends", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_every_cpu_backend_without_errors(capsys, monkeypatch):
    monkeypatch.setenv("FASTLOSS_BACKEND", "torch")  # must come back as it was
    module = _load()
    assert module.main(["--cases", "8", "--seed", "3", "--dtypes", "fp64,fp32"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("8 cases, seed 3, backends ['native', 'blocked']") and summary.endswith(" 0 errors")
    assert os.environ["FASTLOSS_BACKEND"] == "torch" and "FASTLOSS_MNRL_ALGO" not in os.environ


def test_a_raising_backend_is_an_error(capsys, monkeypatch):
    module = _load()
    run = module.run

    def failing(case, inputs, backend, *rest):
        if backend == "native":
            raise RuntimeError("boom")
        return run(case, inputs, backend, *rest)

    monkeypatch.setattr(module, "run", failing)
    assert module.main(["--cases", "3", "--seed", "1", "--dtypes", "fp32"]) == 1
    out = capsys.readouterr().out
    assert "ERROR native torch.float32" in out and "RuntimeError: boom" in out
    assert out.rstrip().endswith(" 3 errors")  # one per case: every case runs the native backend


def test_duplicate_tie_needs_equal_sums_over_the_duplicates():
    """A gradient moved between two equal rows is a tie; one that changes a row's group sum, or a flagged loss, is
    not; nor is a flag on an input without duplicates."""
    module = _load()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]], dtype=torch.float64)
    truth = [torch.tensor(1.0), torch.tensor([[0.5, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64), None]
    names = ["loss", "d0", "dscale"]
    moved = [truth[0], torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.0]], dtype=torch.float64), None]
    changed = [truth[0], torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.4, 0.0]], dtype=torch.float64), None]
    flag = [("d0", 0.5, 1e-6, 1.0)]
    assert module.duplicate_tie(flag, moved, truth, [x], names)
    assert not module.duplicate_tie(flag, changed, truth, [x], names)
    assert not module.duplicate_tie([("loss", 1.0, 1e-6, 1.0), *flag], moved, truth, [x], names)
    assert not module.duplicate_tie(flag, moved, truth, [x[:2]], names)


def test_cuda_blocked_runs_the_half_path_and_restores_it(capsys):
    """``cuda-blocked`` runs the row-block op with the CUDA path's half-dtype GEMM operands on CPU tensors (its
    products take rounded operands) and leaves the op as it was."""
    from fastloss.ops import mnrl_blocked

    module = _load()
    before = (mnrl_blocked.half_gemms, mnrl_blocked.triton_rows)
    halves = []
    mm = mnrl_blocked._mm
    mnrl_blocked._mm = lambda a, b, half, *rest: halves.append(half) or mm(a, b, half, *rest)
    try:
        assert module.main(["--cases", "6", "--seed", "2", "--dtypes", "fp16", "--backends", "cuda-blocked"]) == 0
    finally:
        mnrl_blocked._mm = mm
    assert halves and all(halves)
    assert (mnrl_blocked.half_gemms, mnrl_blocked.triton_rows) == before
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(" 0 errors")
