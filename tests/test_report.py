"""``python -m fastloss``: the report of what this installation runs, and its backend table against the choices the
losses make."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastloss import _backend, _report

NAMES = [name for name, _ in _report.LOSSES]


def test_command_prints_the_report():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLOSS_") and k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fastloss"], capture_output=True, text=True, env=env, check=True)
    text = out.stdout
    assert text.startswith("fastloss ") and f"torch {torch.__version__}" in text
    assert all(name in text for name in NAMES)
    assert "settings: none" in text
    if _backend.native_module() is not None:
        assert "fastloss._C: " in text and "CPU bf16 GEMMs: " in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_column_is_what_cpu_tensors_take(monkeypatch, dtype):
    """The probe (a device and a dtype) gets the choice a real CPU tensor gets, for every loss."""
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    table = _report.backends()
    for name, choose in _report.LOSSES:
        assert table[name]["cpu"] == choose(torch.zeros(2, 3, dtype=dtype))


def test_defaults(monkeypatch):
    for var in ("FASTLOSS_BACKEND", "FASTLOSS_MNRL_ALGO"):
        monkeypatch.delenv(var, raising=False)
    table = _report.backends()
    native = _backend.native_module() is not None
    cuda = "triton" if _backend.triton_available() else "torch"
    assert table[NAMES[0]] == {"cpu": "native" if native else "blocked", "cuda": "blocked"}
    assert table[NAMES[1]] == {
        "cpu": "native" if native else "blocked",
        "cuda": "triton" if cuda == "triton" else "blocked",
    }
    assert table[NAMES[2]] == {"cpu": "native" if native else "closed_form", "cuda": cuda}
    for name in NAMES[3:]:
        assert table[name] == {"cpu": "native" if native else "blocked", "cuda": cuda}


def test_without_the_extension(monkeypatch):
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "native_module", lambda: None)
    cpu = [row["cpu"] for row in _report.backends().values()]
    assert cpu == ["blocked", "blocked", "closed_form", "blocked", "blocked", "blocked"]


def test_settings_change_the_table(monkeypatch):
    monkeypatch.setenv("FASTLOSS_BACKEND", "torch")
    assert all(row == {"cpu": "torch", "cuda": "torch"} for row in _report.backends().values())
    monkeypatch.setenv("FASTLOSS_BACKEND", "native")
    rows = _report.backends().values()
    assert all(row["cuda"].startswith("error: FASTLOSS_BACKEND=native runs on CPU tensors only") for row in rows)
    monkeypatch.delenv("FASTLOSS_BACKEND")
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "flash")
    if _backend.triton_available():
        assert _report.backends()[NAMES[0]]["cuda"] == "triton"
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "sideways")
    assert _report.backends()[NAMES[0]]["cpu"].startswith("error: FASTLOSS_MNRL_ALGO must be one of")
    settings = _report.report().splitlines()[-1]  # every FASTLOSS_* set (CI sets others), sorted
    assert settings.startswith("settings: ")
    assert "FASTLOSS_MNRL_ALGO=sideways" in settings.removeprefix("settings: ").split(", ")


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "no-amx"])
def test_bf16_gemm_off_reason(monkeypatch, amx):
    """Why the CPU ops' bf16 GEMMs are fp32, on any machine: the variable first (a CPU without AMX-BF16 reported
    its lack of AMX for FASTLOSS_NATIVE_BF16_GEMM=0), then what auto needs."""
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "0")
    assert _report._fp32_reason({"mkl_bf16_gemm": True, "amx_bf16": amx}) == "FASTLOSS_NATIVE_BF16_GEMM=0"
    monkeypatch.delenv("FASTLOSS_NATIVE_BF16_GEMM")
    assert _report._fp32_reason({"mkl_bf16_gemm": False, "amx_bf16": amx}) == "this torch carries no MKL bf16 GEMM"
    if not amx:  # with both, auto turns them on: no reason to give
        assert _report._fp32_reason({"mkl_bf16_gemm": True, "amx_bf16": amx}).startswith("the CPU has no AMX-BF16")


@pytest.mark.skipif(_backend.native_module() is None, reason="fastloss._C is not built: the report says so instead")
def test_bf16_gemm_line(monkeypatch):
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "0")
    assert "CPU bf16 GEMMs: fp32 (FASTLOSS_NATIVE_BF16_GEMM=0)" in _report.report()
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "maybe")
    assert "CPU bf16 GEMMs: error: FASTLOSS_NATIVE_BF16_GEMM must be auto, 0 or 1" in _report.report()
