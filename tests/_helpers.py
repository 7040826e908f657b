"""Small shared helpers for the tests (not collected: no test_ prefix)."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

from fastloss import _backend


def sentence_transformers_at_least(version: str) -> bool:
    """fastloss mirrors sentence-transformers 6.3; the GPU image holds 6.0.1 and this machine's Python 6.2.0, where
    some comparisons must differ."""
    import sentence_transformers

    return Version(sentence_transformers.__version__) >= Version(version)


# sentence-transformers < 6.2 finds the semi-hard negative by a masked minimum, min((d - rowmax) * mask) + rowmax,
# whose rounding moves hinges that tie exactly (integer embeddings) off 0 and so changes the gradient there; 6.2 sorts
# and searches, exactly, as fastloss does. Exact-tie comparisons of semi-hard against ST need 6.2.
ST_EXACT_SEMI_HARD_TIES = sentence_transformers_at_least("6.2")


# Triton kernels on CPU tensors run only through the interpreter, which conftest turns on where CUDA is absent; on
# a GPU machine (no interpreter) the tests that hand CPU tensors to them skip, and the GPU tests cover the kernels
NO_INTERPRETER = "Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set without CUDA; a GPU runs the GPU tests)"


def interpreted() -> bool:
    """Whether Triton kernels can take CPU tensors here (Triton installed, TRITON_INTERPRET=1)."""
    return _backend.triton_available() and _backend.triton_interpret()


def require_interpreter() -> None:
    """Skip the calling test (or fixture) where Triton kernels cannot take CPU tensors."""
    if not interpreted():
        pytest.skip(NO_INTERPRETER)


needs_interpreter = pytest.mark.skipif(not interpreted(), reason=NO_INTERPRETER)


def available_backends() -> list[str]:
    """Backends the CPU-tensor tests can run: the reference; native if built; triton under TRITON_INTERPRET=1."""
    out = ["torch"]
    if _backend.native_has("mnrl_fused"):
        out.append("native")
    if interpreted():  # CPU tensors need the interpreter
        out.append("triton")
    return out


def use_backend(monkeypatch, name: str) -> None:
    """The MNRL family on ``name``: a FASTLOSS_BACKEND value, or "blocked" (the row-block op, FASTLOSS_MNRL_ALGO)."""
    if name == "blocked":
        monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
        monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "blocked")
    else:
        monkeypatch.setenv("FASTLOSS_BACKEND", name)


def force_configs(monkeypatch, kernel, configs: list) -> None:
    """An autotuned Triton kernel tunes among exactly ``configs`` (no pruning) from its next call, as if new."""
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "early_config_prune", None)
    monkeypatch.setattr(kernel, "cache", {})


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_relative_errors(got: list[torch.Tensor], truth: list[torch.Tensor]) -> list[float]:
    """Each result's largest absolute error against its truth over the truth's largest magnitude."""
    return [float((a - t).abs().max() / t.abs().max()) for a, t in zip(got, truth)]


def two_part_value(x: torch.Tensor) -> torch.Tensor:
    """A two-part LSE [2, ...] (fastloss.ops.two_part) as one fp64 value, hi + lo."""
    assert x.dtype == torch.float32 and x.shape[0] == 2
    return x[0].double() + x[1].double()


def two_parts(x: torch.Tensor) -> torch.Tensor:
    """An fp64 LSE as the two fp32 parts that the kernels take: hi = x rounded, lo = x - hi rounded."""
    hi = x.float()
    return torch.stack([hi, torch.where(torch.isfinite(x), x - hi.double(), 0.0).float()])


# A trained model's batch: each positive far above its negatives (noise added to the positives, scale), so the loss
# is tiny and every softmax row nearly one-hot: losses ~2e-5, ~5e-6 and ~7e-16 at B = 256, D = 128.
CONFIDENT = {"loss2e-5": (0.6, 20.0), "loss5e-6": (0.4, 20.0), "loss7e-16": (0.5, 50.0)}
CONFIDENT_LAYOUTS = {  # partition, directions
    "qd": ("joint", ("query_to_doc",)),
    "qd+dq-per": ("per_direction", ("query_to_doc", "doc_to_query")),
    "all4": ("joint", ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")),
}


def confident_errors(noise: float, scale: float, partition: str, directions: tuple, seed: int = 1):
    """(errors of fastloss's drop-in MNRL in fp32, errors of sentence-transformers' in fp32) against the fp64 truth
    (sentence-transformers' in fp64) on a confident batch: loss, dq, dd, each relative to the size of its truth."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as Theirs

    from fastloss.losses import MultipleNegativesRankingLoss as Ours

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(256, 128, generator=g, dtype=torch.float64)
    d = q + noise * torch.randn(256, 128, generator=g, dtype=torch.float64)
    config = dict(scale=scale, directions=directions, partition_mode=partition)

    def run(loss_module, dtype):
        leaves = [x.to(dtype).requires_grad_(True) for x in (q, d)]
        loss = loss_module.compute_loss_from_embeddings(leaves, None)
        return [loss.detach().double(), *(x.double() for x in torch.autograd.grad(loss, leaves))]

    truth = run(Theirs(None, **config), torch.float64)
    ours, theirs = run(Ours(None, **config), torch.float32), run(Theirs(None, **config), torch.float32)
    return max_relative_errors(ours, truth), max_relative_errors(theirs, truth)


# ATen ops that launch nothing on CUDA (views, metadata, allocations, host scalars)
NO_LAUNCH = {
    "prim.device", "aten.view", "aten.as_strided", "aten.alias", "aten.t", "aten.transpose", "aten.slice",
    "aten.diagonal", "aten.detach", "aten.expand", "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.unbind",
    "aten.lift_fresh", "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.scalar_tensor",
}  # fmt: skip


def _host_copy(func, args, kwargs) -> str | None:
    """'host_to_device' / 'device_to_host' for an ATen copy between the CPU and another device (a host sync on CUDA:
    torch.tensor(x, device="cuda") is one, torch.full is not), 'device_read' for a scalar read of a device tensor
    (.item(), bool(), float()), else None."""
    name = str(func.overloadpacket)
    if name == "aten._local_scalar_dense":
        return "device_read" if args[0].device.type != "cpu" else None
    if name not in ("aten._to_copy", "aten.copy_"):
        return None
    src, dst = (args[0], kwargs.get("device")) if name == "aten._to_copy" else (args[1], args[0].device)
    if dst is None or (torch.device(dst).type == "cpu") == (src.device.type == "cpu"):
        return None
    return "host_to_device" if src.device.type == "cpu" else "device_to_host"


def launch_counter(launches: list):
    """A dispatch mode that appends to ``launches`` the name of each ATen op that would launch a CUDA kernel (for
    fake CUDA tensors under FakeTensorMode; the Triton launches, which fake tensors cannot run, are the caller's
    stubs to count), and 'host_to_device' / 'device_to_host' for a copy between host and device (a host sync).
    Tests using it are marked ``unpoisoned``: conftest's NaN fill of torch.empty would count."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LaunchCounter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            copy = _host_copy(func, args, kwargs or {})
            if copy is not None or str(func.overloadpacket) not in NO_LAUNCH:
                launches.append(copy or str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    return LaunchCounter()


def host_syncs(syncs: list):
    """A dispatch mode that appends to ``syncs`` each host sync an op on fake CUDA tensors would make: copies between
    host and device and scalar reads of device tensors (_host_copy; a scalar read, of any tensor, returns True or 1.0,
    so that the code goes on as with valid data)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncSpy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kind = _host_copy(func, args, kwargs or {})
            if kind is not None:
                syncs.append(kind)
            if str(func.overloadpacket) == "aten._local_scalar_dense":  # fake tensors hold no values
                return True if args[0].dtype == torch.bool else 1.0
            return func(*args, **(kwargs or {}))

    return SyncSpy()


def mkl_bf16_gemm() -> bool:
    """Whether fastloss._C is built and this torch carries MKL's bf16 GEMM (FASTLOSS_NATIVE_BF16_GEMM=1 works)."""
    return _backend.native_has("build_info") and bool(_backend.native_module().build_info()["mkl_bf16_gemm"])


NO_MKL_BF16 = "no fastloss._C, or this torch carries no MKL bf16 GEMM (cblas_gemm_bf16bf16f32): the ops keep fp32 GEMMs"


def aten_op_names(fn) -> set[str]:
    """The names of the aten ops torch's profiler records while fn() runs (e.g. aten::mm, which the native ops' bf16
    GEMMs do not call)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("aten::")}


def small_rows_fp16(case: str) -> list[torch.Tensor]:
    """fp16 columns (queries alike, positives near them) with one small row whose entries of P (times the inverse
    norms) all lie below fp16's subnormals (2^-24): ``far_doc``, a hard negative of norm 2e-4 orthogonal to the
    queries (its entries ~1e-9 in every query's row), or ``confident_query``, a query of norm 2e-4 orthogonal to the
    docs with its positive next to it (its row's entries, the positive's P - 1 folded in, ~1e-9). Their gradients,
    amplified by 1 / |x|, reach 2.6e-3 and 6.8e-4."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 8, generator=g, dtype=torch.float64) + 1.5
    p = q + 0.2 * torch.randn(8, 8, generator=g, dtype=torch.float64)
    mean = q.mean(dim=0) / q.mean(dim=0).norm()
    side = torch.randn(8, generator=g, dtype=torch.float64)
    side = side - (side @ mean) * mean
    side = side / side.norm() * 2e-4
    if case == "far_doc":
        n = torch.randn(8, 8, generator=g, dtype=torch.float64)
        n[3] = side
        return [x.half() for x in (q, p, n)]
    q[3] = side
    p[3] = side + 6e-6 * torch.randn(8, generator=g, dtype=torch.float64)
    return [x.half() for x in (q, p)]


def assert_small_row_keeps_its_gradient(case: str) -> None:
    """small_rows_fp16(case) through the MNRL loss on the backend the environment selects, fp16 against fp64 on the
    same values: the small row's gradient within 1e-3 of the truth, every gradient within 2e-2 of its size."""
    import fastloss.functional as FF

    columns = small_rows_fp16(case)
    grads = []
    for dtype in (torch.float16, torch.float64):
        leaves = [leaf(x.to(dtype)) for x in columns]
        FF.mnrl_loss(leaves[0], leaves[1:], 20.0).backward()
        grads.append([x.grad.double() for x in leaves])
    ours, truth = grads
    which = 2 if case == "far_doc" else 0
    assert rel_err(ours[which][3], truth[which][3]) <= 1e-3
    assert all(rel_err(a, b) <= 2e-2 for a, b in zip(ours, truth))
