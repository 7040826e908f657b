"""The Triton kernels compile for Hopper (sm_90) and fit it, checked without a GPU.

The rest of the suite runs the kernels under TRITON_INTERPRET=1, which never lowers them to PTX: a kernel can pass
there and still fail to compile for a GPU (a tl.dot shape the hardware lowering rejects, a type the interpreter lets
through) or need more shared memory than an SM has. scripts/triton_aot.py compiles every launch the host wrappers
make, with every autotune configuration, for a real target; here on the quick matrix (D = 100, 256, 1000: both D
regimes and the largest single tile; fp32 with ieee and tf32x3 dots, fp16).
It runs in a subprocess because the kernels' GPU configurations are chosen at import, without the interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton")
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


needs_nvidia_tools = pytest.mark.skipif(
    not (NVIDIA_BIN / "ptxas").exists() or not (NVIDIA_BIN / "cuobjdump").exists(),
    reason="this Triton build has no NVIDIA backend tools (ptxas, cuobjdump) to compile with",
)


def _triton_aot(*args: str) -> str:
    """scripts/triton_aot.py's output with ``args``, asserting it exits 0."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLOSS_ALLOW_TF32", "FASTLOSS_FP32_DOT")
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "triton_aot.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        # a cold Triton cache on a 2-core AMD EPYC (Zen 3): the sm_90 quick matrix took 831 s (790 compiles); warm, 10 s
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    return done.stdout


@needs_nvidia_tools
def test_kernels_compile_and_fit_sm90():
    stdout = _triton_aot("--arch", "90", "--quick")
    assert "sm_90: 0 problems" in stdout
    # every host wrapper launched its kernels: a recording that silently missed one would check nothing
    for kernel in (
        "sim_lse_fwd_kernel",
        "sim_lse_bwd_dr_kernel",
        "sim_lse_bwd_dc_kernel",
        "cosent_sim_fwd_kernel",
        "cosent_rank_kernel",
        "cosent_sim_bwd_kernel",
        "batch_hard_fwd_kernel",
        "refine_selected_kernel",
        "row_stats_kernel",
        "row_grad_kernel",
        "inverse_norms_kernel",
        "l2norm_bwd_kernel",
        "one_direction_terms_kernel",
        "directions_terms_kernel",
        "backward_weights_kernel",
    ):
        assert kernel in stdout, f"{kernel} was never compiled"


@needs_nvidia_tools
def test_half_d256_fits_gpus_with_less_shared_memory():
    """fp16 at D = 256, the largest single tile on sm_80/sm_90, fits sm_86 (A10, RTX 30xx; ~99 KB a block, as sm_89)
    and sm_75 (T4, 64 KB): there D goes in chunks (sim_lse.SINGLE_D_MIN_SHARED), where one tile's backward needed
    107-131 KB and no configuration fitted."""
    stdout = _triton_aot("--arch", "86", "--arch", "75", "--quick", "--dim", "256", "--dtype", "fp16")
    assert "sm_86: 0 problems" in stdout and "sm_75: 0 problems" in stdout
    assert "sim_lse_bwd_dr_kernel" in stdout and "sim_lse fp16 D=256" in stdout


def test_fp32_only_tiles_are_pruned_for_half_dtypes():
    """The tiles added for fp32 operands are neither compiled nor timed for half dtypes (each costs a compile on a
    kernel's first call for a given D), and fp32 keeps every tile."""
    import torch

    from fastloss.ops import sim_lse, triplet

    cases = [
        (sim_lse._prune_fwd, sim_lse._FWD_CONFIGS, sim_lse._FP32_FWD, sim_lse._WIDE_FWD, "r", {"D": 64}),
        (sim_lse._prune_bwd, sim_lse._BWD_CONFIGS, sim_lse._FP32_BWD, sim_lse._WIDE_BWD, "r", {"D": 64}),
        (triplet._prune, triplet._TILES, triplet._FP32_TILES, [], "x", {}),
    ]
    for prune, configs, fp32_only, wide, name, extra in cases:
        for dtype in (torch.float16, torch.bfloat16):
            half = prune(configs, {name: torch.empty(1, dtype=dtype), **extra})
            assert len(half) == len(configs) - len(fp32_only) - len(wide) > 0
            assert not any(cfg is tile for cfg in half for tile in fp32_only + wide)
        fp32 = [cfg for cfg in configs if all(cfg is not tile for tile in wide)]
        assert prune(configs, {name: torch.empty(1, dtype=torch.float32), **extra}) == fp32


def test_autotune_first_keeps_the_first_pruned_tile(monkeypatch):
    """FASTLOSS_AUTOTUNE=first: each kernel compiles the first tile its pruning keeps and times nothing (the Triton
    autotuner takes a single pruned config without benchmarking it)."""
    import torch

    from fastloss.ops import sim_lse, triplet

    cases = [
        (sim_lse._prune_fwd, sim_lse._FWD_CONFIGS, "r", {"D": 1024}),
        (sim_lse._prune_bwd, sim_lse._BWD_CONFIGS, "r", {"D": 1024}),
        (triplet._prune, triplet._TILES, "x", {}),
    ]
    for prune, configs, name, extra in cases:
        for dtype in (torch.float32, torch.bfloat16):
            args = {name: torch.empty(1, dtype=dtype), **extra}
            monkeypatch.delenv("FASTLOSS_AUTOTUNE", raising=False)
            tuned = prune(configs, args)
            assert len(tuned) > 1
            monkeypatch.setenv("FASTLOSS_AUTOTUNE", "first")
            assert prune(configs, args) == tuned[:1]


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_wide_tiles_only_for_half_dtypes_with_chunked_d(kind):
    """The wide sim_lse tiles are compiled and timed only where they pay and do not spill: fp16/bf16 operands with
    D looped in chunks (D > SINGLE_D_MAX)."""
    import torch

    from fastloss.ops import sim_lse

    prune, configs, wide = {
        "fwd": (sim_lse._prune_fwd, sim_lse._FWD_CONFIGS, sim_lse._WIDE_FWD),
        "bwd": (sim_lse._prune_bwd, sim_lse._BWD_CONFIGS, sim_lse._WIDE_BWD),
    }[kind]

    def kept(dtype, D):
        out = prune(configs, {"r": torch.empty(1, dtype=dtype), "D": D})
        return sum(any(cfg is tile for tile in wide) for cfg in out)

    for dtype in (torch.float16, torch.bfloat16):
        assert kept(dtype, sim_lse.SINGLE_D_MAX + 1) == len(wide) > 0
        assert kept(dtype, 1024) == len(wide)
        assert kept(dtype, sim_lse.SINGLE_D_MAX) == 0
    assert kept(torch.float32, 1024) == 0


def test_fp32_operands_chunk_d_above_128():
    """fp32 operands loop D in chunks above D = 128 (single tiles up to 256 spilled kilobytes per thread on sm_90);
    fp16/bf16 keep one tile up to SINGLE_D_MAX."""
    import torch

    from fastloss.ops import sim_lse

    single, block_d = sim_lse._HEURISTICS["SINGLE_D"], sim_lse._HEURISTICS["BLOCK_D"]
    for dtype, largest in ((torch.float32, 128), (torch.float16, 256), (torch.bfloat16, 256)):
        args = {"r": torch.empty(1, dtype=dtype)}
        assert single({**args, "D": largest}) and block_d({**args, "D": largest}) == largest
        assert not single({**args, "D": largest + 1}) and block_d({**args, "D": largest + 1}) == sim_lse.CHUNK_D


def test_half_tiles_follow_the_gpus_shared_memory(monkeypatch):
    """fp16/bf16 keep one tile of D up to SINGLE_D_MAX where a thread block may use SINGLE_D_MIN_SHARED bytes (sm_80,
    sm_90) and chunk above SINGLE_D_MAX_FP32 where less (sm_86 / sm_89: 99 KB, sm_75: 64 KB); fp32 chunks above 128
    everywhere; tensors off CUDA (the interpreter) take the large GPUs' choice."""
    import torch

    from fastloss.ops import sim_lse

    single = sim_lse._HEURISTICS["SINGLE_D"]
    cuda = torch.device("cuda")
    for shared, largest_half in ((232448, 256), (166912, 256), (101376, 128), (65536, 128), (None, 256)):
        monkeypatch.setattr(sim_lse, "shared_memory", lambda device, shared=shared: shared)
        for dtype, largest in ((torch.float16, largest_half), (torch.bfloat16, largest_half), (torch.float32, 128)):
            r = torch.empty(1, dtype=dtype, device="meta")  # only the dtype and the device are read
            assert single({"r": r, "D": largest}) and not single({"r": r, "D": largest + 1}), (shared, dtype)
    monkeypatch.undo()
    assert sim_lse.shared_memory(torch.device("cpu")) is None
    reads = []

    def properties(index):
        reads.append(index)
        return type("Props", (), {"shared_memory_per_block_optin": 101376})()

    sim_lse._device_shared.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    try:
        assert sim_lse.shared_memory(cuda) == sim_lse.shared_memory(torch.device("cuda", 0)) == 101376
        assert sim_lse.shared_memory(torch.device("cuda", 1)) == 101376 and reads == [0, 1]  # once per GPU
    finally:
        sim_lse._device_shared.cache_clear()
