"""Compile every Triton kernel of fastloss for a GPU architecture on a machine without a GPU, and check its resources.

The interpreter (TRITON_INTERPRET=1), which the test suite uses, never lowers a kernel to PTX, so it accepts kernels
that fail to compile for a GPU, or that compile but do not fit one: a tile whose shared memory exceeds the SM's, or
registers that spill. This script drives the real host wrappers (sim_lse_fwd/bwd and SimLseBackward's windows,
sim_lse.one_direction_terms / directions_terms / backward_weights, cosent_fwd/bwd, batch_hard_fwd,
block_softmax.row_stats/row_grad, l2norm.inverse_norms / l2norm_bwd) with a stand-in for each kernel that records its
launch instead of running it, then compiles each recorded launch for the target with every configuration its
autotuner may pick (heuristics applied, early pruning included), the constants and argument types the launch would
have on a GPU, and reads the resources from the cubin.

    python3 scripts/triton_aot.py                 # sm_90 (H100/H200) and sm_80 (A100), the full matrix
    python3 scripts/triton_aot.py --arch 90 --quick

It fails (exit 1) when a launch does not compile, or when none of an autotuned kernel's configurations fits the
architecture's shared memory (the autotuner skips those that do not fit, so one that fits is enough). Spilled
registers are reported, not failed: they cost speed, not correctness. tests/test_triton_aot.py runs the quick matrix.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("triton_aot: unset TRITON_INTERPRET: the kernels' GPU configurations are chosen at import")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastloss.ops import block_softmax, cosent, l2norm, sim_lse, triplet  # noqa: E402

# Most dynamic shared memory one thread block may use (bytes), per compute capability.
SHARED_LIMIT = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}
DTYPES = {
    "fp32": torch.float32,
    "fp32/tf32x3": torch.float32,
    "fp32/tf32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
TORCH_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
}


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the kernel object (autotuner, heuristics or jit function) and its arguments."""

    case: str
    kernel: object
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Result:
    case: str
    kernel: str
    config: str
    shared: int = 0
    registers: int = 0
    stack: int = 0
    error: str = ""
    seconds: float = 0.0

    def fits(self, arch: int) -> bool:
        return not self.error and self.shared <= SHARED_LIMIT[arch]


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, sink: list[Launch], case: Callable[[], str]):
        self.kernel, self.sink, self.case = kernel, sink, case

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.case(), self.kernel, args, kwargs))

    def __getattr__(self, name):  # the kernel's own attributes (its autotune configs), which host code reads
        return getattr(self.__dict__["kernel"], name)


KERNELS = {
    sim_lse: (
        "sim_lse_fwd_kernel",
        "sim_lse_bwd_dr_kernel",
        "sim_lse_bwd_dc_kernel",
        "one_direction_terms_kernel",
        "directions_terms_kernel",
        "backward_weights_kernel",
    ),
    cosent: ("cosent_sim_fwd_kernel", "cosent_rank_kernel", "cosent_sim_bwd_kernel"),
    triplet: ("batch_hard_fwd_kernel", "refine_selected_kernel"),
    block_softmax: ("row_stats_kernel", "row_grad_kernel"),
    l2norm: ("inverse_norms_kernel", "l2norm_bwd_kernel"),
}


@contextlib.contextmanager
def shared_memory_of(arch: int) -> Iterator[None]:
    """The kernels' choices that depend on the GPU's shared memory (sim_lse: one tile of D or chunks), made for
    ``arch`` while its launches are compiled."""
    saved = sim_lse.shared_memory
    sim_lse.shared_memory = lambda device: SHARED_LIMIT[arch]
    try:
        yield
    finally:
        sim_lse.shared_memory = saved


@contextlib.contextmanager
def recording(sink: list[Launch], case: Callable[[], str]) -> Iterator[None]:
    saved = {(mod, name): getattr(mod, name) for mod, names in KERNELS.items() for name in names}
    try:
        for (mod, name), kernel in saved.items():
            setattr(mod, name, _Recorder(kernel, sink, case))
        yield
    finally:
        for (mod, name), kernel in saved.items():
            setattr(mod, name, kernel)


def record_launches(quick: bool, only_dims=(), only_dtypes=()) -> list[Launch]:
    """Call the host wrappers over the shapes and flags that select different kernel code, recording the launches
    (of the dims and dtypes given, where given)."""
    dims = (100, 256, 1000) if quick else (64, 100, 256, 768, 1000)
    dtypes = ("fp32", "fp32/tf32x3", "fp16") if quick else ("fp32", "fp32/tf32x3", "fp32/tf32", "fp16", "bf16")
    dims = tuple(d for d in dims if d in only_dims) if only_dims else dims
    dtypes = tuple(d for d in dtypes if d in only_dtypes) if only_dtypes else dtypes
    launches: list[Launch] = []
    label = [""]
    os.environ.pop("FASTLOSS_ALLOW_TF32", None)  # FASTLOSS_FP32_DOT is set per case below ("fp32/tf32x3": tf32x3)
    with recording(launches, lambda: label[0]):
        for name, dim in itertools.product(dtypes, dims):
            dtype = DTYPES[name]
            r, c = torch.zeros(48, dim, dtype=dtype), torch.zeros(96, dim, dtype=dtype)
            flags = dict(period=48, offset=0, mask_own=False, pen_mode=3, alpha=0.1)
            ones_r, ones_c, lse, g = torch.ones(48), torch.ones(96), torch.zeros(2, 48), torch.zeros(48)
            os.environ["FASTLOSS_FP32_DOT"] = name.split("/")[1] if "/" in name else "ieee"
            for positive in (False, True):  # MNRL's directions without / with the positive pair
                label[0] = f"sim_lse {name} D={dim}" + (" positive" if positive else "")
                sim_lse.sim_lse_fwd(r, c, ones_r, ones_c, 20.0, positive_col=positive, **flags)
                if positive:  # the symmetric loss's forward: doc_to_query's statistics from the same tiles
                    label[0] += " transposed"
                    nlse_t = torch.empty(2, 48)
                    sim_lse.sim_lse_fwd(r, c, ones_r, ones_c, 20.0, positive_col=True, nlse_t=nlse_t, **flags)
                    label[0] = f"sim_lse {name} D={dim} positive"
                pos_val = g if positive else None
                sim_lse.sim_lse_bwd(r, c, ones_r, ones_c, 20.0, lse, g, need_dscale=True, pos_val=pos_val, **flags)
                if positive:  # a window of MNRL's backward that a second direction adds into (ACCUMULATE)
                    label[0] += " accumulate"
                    bwd = sim_lse.SimLseBackward(r, c, ones_r, ones_c, 20.0, lse, g, pos_val=pos_val, **flags)
                    bwd.rows(torch.zeros(48, dim), 0, 48, accumulate=True, dscale=torch.zeros(48))
                    bwd.candidates(torch.zeros(96, dim), 0, 96, accumulate=True)
                    # the symmetric loss: doc_to_query's softmax in query_to_doc's launch (TRANSPOSED), written and,
                    # in full, added into a window (gathered queries: doc_to_query's other launches share it)
                    label[0] = f"sim_lse {name} D={dim} positive transposed"
                    bwd = sim_lse.SimLseBackward(r, c, ones_r, ones_c, 20.0, lse, g, pos_val=g, lse_t=lse, **flags)
                    for accumulate in (False,) if quick else (False, True):
                        bwd.rows(torch.zeros(48, dim), 0, 48, accumulate=accumulate, dscale=torch.zeros(48))
                        bwd.candidates(torch.zeros(96, dim), 0, 96, accumulate=accumulate)
            # query_to_query, doc_to_doc: the own entry masked; their backward's Gram block (TRANSPOSED with MASK_OWN,
            # a rows launch only, added into the window of the direction before it)
            label[0] = f"sim_lse {name} D={dim} gram"
            own = dict(flags, mask_own=True, pen_mode=0, alpha=0.0)
            sim_lse.sim_lse_fwd(r, r, ones_r, ones_r, 20.0, **own)
            bwd = sim_lse.SimLseBackward(r, r, ones_r, ones_r, 20.0, lse, g, lse_t=lse, **own)
            bwd.rows(torch.zeros(48, dim), 0, 48, accumulate=True, dscale=torch.zeros(48))
            label[0] = f"l2norm {name} D={dim}"  # the flash MNRL forward's prologue and backward's epilogue
            x = torch.zeros(48, dim, dtype=dtype)
            for normalize in (True, False):  # cosine and dot similarity; the positive pairs' launch and another's
                l2norm.inverse_norms([x, x], [0, 64], 128, normalize, pairs=(0, 48))
            for scaled in (False, True):  # the flash path's dx_hat, the row-block op's inv * dx_hat
                l2norm.l2norm_bwd(x, torch.ones(48), torch.zeros(48, dim), torch.empty_like(x), scaled=scaled)
            # the flash path's windows of q and of the positives' block, with the positive pair's term; the row-block
            # op's query rows, with its weights from the row pass
            y, y_inv, coef = torch.zeros(32, dim, dtype=dtype), torch.ones(32), torch.zeros(32)
            for scaled, positive in ((False, (y, y_inv, coef, 8)), (True, (y, None, coef, 8))):
                grad = torch.zeros(48, dim)
                l2norm.l2norm_bwd(x, torch.ones(48), grad, torch.empty_like(x), scaled=scaled, positive=positive)
            label[0] = f"cosent {name} D={dim}"
            a, b, scale = torch.zeros(16, dim, dtype=dtype), torch.zeros(32, dim, dtype=dtype), torch.tensor(20.0)
            for kind in (cosent.KIND_COS,) if quick else (cosent.KIND_COS, cosent.KIND_ANGLE):
                cosent.cosent_fwd(a, b, torch.arange(32), scale, kind)
                aux = torch.zeros(4, 32)
                cosent.cosent_bwd(torch.tensor(1.0), a, b, scale, aux, torch.tensor(0.0), kind)
            label[0] = f"batch_hard {name} D={dim}"
            x = torch.empty(64, dim, dtype=dtype, device="meta")
            for metric in (triplet.EUCLIDEAN,) if quick else (triplet.EUCLIDEAN, triplet.COSINE):
                triplet.batch_hard_fwd(x, torch.zeros(64, dtype=torch.int64, device="meta"), metric)
        for name in dtypes:  # the row passes of the row-block MNRL op: G in the input dtype (fp32: in place)
            label[0] = f"block_softmax {name}"
            s, inv_r, inv_c, scale = torch.zeros(48, 96), torch.ones(48), torch.ones(96), torch.tensor(20.0)
            for mask_own, pen_mode in ((False, 3), (True, 0)):
                opts = dict(period=48, offset=0, mask_own=mask_own, pen_mode=pen_mode, alpha=0.1)
                # the positive's column summed apart in the directions that hold it (the unmasked one here)
                top, *_ = block_softmax.row_stats(s, inv_r, inv_c, scale, positive_col=not mask_own, **opts)
                out = torch.zeros(48, 96, dtype=DTYPES[name])
                block_softmax.row_grad(s, inv_r, inv_c, scale, top, out, **opts)
                # fp16: G_r too, G's rows scaled by powers of two from each row's max (the statistics' launch)
                gmax = torch.zeros(48) if name == "fp16" else None
                scaled = (gmax, not mask_own, torch.zeros(48), torch.zeros_like(out)) if name == "fp16" else None
                if scaled is not None:
                    block_softmax.row_stats(s, inv_r, inv_c, scale, positive_col=not mask_own, gmax=gmax, **opts)
                    block_softmax.row_grad(s, inv_r, inv_c, scale, top, out, scaled=scaled, **opts)
                if not mask_own:  # the positive's coefficient folded into its entry
                    fold = (torch.zeros(48), torch.ones(48), 1.0, torch.zeros(48))
                    for both in (None, scaled) if scaled is not None else (None,):
                        block_softmax.row_grad(s, inv_r, inv_c, scale, top, out, fold=fold, scaled=both, **opts)
                        # query_to_doc alone: the block's terms in the statistics' launch, the separate term's weight
                        pos_w = (torch.zeros(48), 0.5)
                        # half GEMM operands: G's rows times the row weights' mantissas (as the op runs them)
                        mant = torch.ones(48) if name in ("fp16", "bf16") else None
                        block_softmax.row_grad(
                            s, inv_r, inv_c, scale, top, out, fold=fold, pos_w=pos_w, scaled=both, mant=mant, **opts
                        )
                    for joint in (True, False):
                        terms = (torch.zeros(48), torch.zeros(48), torch.zeros(48), 0.5, joint, torch.zeros(48))
                        block_softmax.row_stats(s, inv_r, inv_c, scale, positive_col=True, terms=terms, **opts)
                        if name in ("fp16", "bf16"):  # the row weights' mantissas (and fp16's row max)
                            mant = (torch.zeros(48), name == "fp16")
                            block_softmax.row_stats(
                                s, inv_r, inv_c, scale, positive_col=True, terms=terms, gmax=gmax, mant=mant, **opts
                            )
                        # the flash path's loss and pos_val of query_to_doc alone
                        sim_lse.one_direction_terms(torch.zeros(2, 48), torch.zeros(48), scale, joint)
                        # and of several directions: the symmetric loss (both hold the positive), query_to_doc with
                        # query_to_query and doc_to_doc (one holder of three), GTE's four (two holders); the symmetric
                        # loss and GTE also with doc_to_query's LSE formed in the launch (derive), as the forward runs
                        for shares, derive in (([0.5, 0.5], [1]), ([1.0, 0.0, 0.0], []), ([0.5, 0.0, 0.5, 0.0], [2])):
                            lse = torch.zeros(2, len(shares), 48)
                            sim_lse.directions_terms(lse, lse, torch.zeros(48), shares, joint)
                            if derive:
                                sim_lse.directions_terms(lse, lse.clone(), torch.zeros(48), shares, joint, derive)
                            # the backward's weights, with and without the merged launch's positive coefficient
                            pos_val = torch.zeros(len(shares), 48)
                            for back in {0, *derive}:
                                sim_lse.backward_weights(scale, scale, lse, lse[:, 0], pos_val, pos_val[0], joint, back)
                        # query_to_doc alone's
                        one = torch.zeros(1, 48)
                        sim_lse.backward_weights(
                            scale, scale, torch.zeros(2, 1, 48), one.expand(2, 48), one, one[0], joint, 0
                        )
        if not quick:  # the ranking kernel's block grows with the number of pairs, up to 4096 with 16 warps
            for n_pairs in (600, 5000):
                label[0] = f"cosent rank N={n_pairs}"
                a = torch.zeros(n_pairs, 8)
                cosent.cosent_fwd(a, a, torch.arange(n_pairs), torch.tensor(20.0), cosent.KIND_COS)
    return launches


def _unwrap(kernel) -> tuple[list[triton.Config] | None, Callable | None, dict, object]:
    """(autotune configs or None, early prune or None, heuristics, jit function) of a decorated kernel."""
    configs, prune, heuristics = None, None, {}
    while not isinstance(kernel, triton.runtime.JITFunction):
        if isinstance(kernel, triton.runtime.Autotuner):
            configs, prune = kernel.configs, kernel.early_config_prune
        elif isinstance(kernel, triton.runtime.Heuristics):
            heuristics = kernel.values
        kernel = kernel.fn
    return configs, prune, heuristics, kernel


def _arg_type(value) -> tuple[str, bool]:
    """(Triton signature type, divisible by 16) of a runtime argument as the launcher would specialise it."""
    if isinstance(value, torch.Tensor):
        return "*" + TORCH_TYPES[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"triton_aot: no signature type for {type(value).__name__}")


def _compile_units(launch: Launch) -> Iterator[tuple[str, ASTSource, dict]]:
    """(config text, source, options) for each configuration the launch may run with."""
    configs, prune, heuristics, fn = _unwrap(launch.kernel)
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    given = {k: v for k, v in launch.kwargs.items() if k not in options}
    named = dict(zip(fn.arg_names, launch.args)) | given
    if configs is None:
        configs = [triton.Config({}, num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3))]
    elif prune is not None:
        configs = prune(configs, named)
    for cfg in configs:
        values = named | cfg.kwargs
        for key, heuristic in heuristics.items():
            values[key] = heuristic(values)
        signature, constants, attrs = {}, {}, {}
        for i, (arg, param) in enumerate(zip(fn.arg_names, fn.params)):
            if param.is_constexpr:
                signature[arg], constants[arg] = "constexpr", values[arg]
            else:
                kind, aligned = _arg_type(values[arg])
                signature[arg] = kind
                if aligned:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        text = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" w{cfg.num_warps} s{cfg.num_stages}"
        source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
        yield text.strip(), source, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _resources(cubin: bytes, arch: int) -> tuple[int, int]:
    """(registers per thread, stack frame bytes: spilled registers live there) from the cubin (cuobjdump)."""
    tool = shutil.which("cuobjdump") or str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return (int(registers.group(1)) if registers else -1), (int(stack.group(1)) if stack else -1)


_UNITS: list[tuple[str, str, ASTSource, dict, int]] = []  # what the forked workers compile, by index


def _compile_one(index: int) -> Result:
    case, text, source, options, arch = _UNITS[index]
    result = Result(case, source.fn.__name__, text)
    start = time.perf_counter()
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        result.shared = compiled.metadata.shared
        result.registers, result.stack = _resources(compiled.asm["cubin"], arch)
    except Exception as exc:  # a failed compile is the finding: keep its first line and go on
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    result.seconds = time.perf_counter() - start
    return result


def compile_launches(launches: list[Launch], arch: int, jobs: int | None = None) -> list[Result]:
    """Compile each distinct (kernel, constants, types, options) once, in ``jobs`` forked processes (default: one per
    CPU); results in launch order."""
    seen = set()
    _UNITS.clear()
    for launch in launches:
        for text, source, options in _compile_units(launch):
            key = (source.hash(), tuple(sorted(options.items())))
            if key not in seen:
                seen.add(key)
                _UNITS.append((launch.case, text, source, options, arch))
    jobs = min(jobs or os.cpu_count() or 1, len(_UNITS))
    if jobs <= 1:
        return [_compile_one(i) for i in range(len(_UNITS))]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_one, range(len(_UNITS)), chunksize=1)


def _by_launch(results: list[Result]) -> dict[tuple[str, str], list[Result]]:
    """The results grouped by launch (case, kernel), one entry per configuration."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.case, r.kernel), []).append(r)
    return groups


def problems(results: list[Result], arch: int) -> list[str]:
    """Compile errors, and launches (case + kernel) none of whose configurations fits the shared memory."""
    found = [f"{r.case} {r.kernel} [{r.config}]: {r.error}" for r in results if r.error]
    for (case, kernel), group in _by_launch(results).items():
        if not any(r.fits(arch) for r in group):
            worst = min(r.shared for r in group)
            found.append(f"{case} {kernel}: no configuration fits sm_{arch} ({worst} > {SHARED_LIMIT[arch]} B shared)")
    return found


def spilling(results: list[Result], arch: int) -> list[str]:
    """Launches (case + kernel) all of whose fitting configurations need a stack (spilled registers)."""
    groups = _by_launch([r for r in results if r.fits(arch)])
    return [
        f"{case} {kernel}: least stack {min(r.stack for r in group)} B over {len(group)} configurations"
        for (case, kernel), group in groups.items()
        if min(r.stack for r in group) > 0
    ]


def report(results: list[Result], arch: int) -> str:
    lines = [f"sm_{arch}: {len(results)} compiles, {sum(r.seconds for r in results):.0f} s"]
    lines.append(f"{'case':<26} {'kernel':<24} {'config':<36} {'shared':>7} {'regs':>4} {'stack':>5}")
    for r in results:
        status = r.error or ("" if r.fits(arch) else "does not fit")
        lines.append(
            f"{r.case:<26} {r.kernel:<24} {r.config:<36} {r.shared:>7} {r.registers:>4} {r.stack:>5} {status}".rstrip()
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT), help="repeatable")
    parser.add_argument("--quick", action="store_true", help="fewer dims/dtypes/flags (what the test runs)")
    parser.add_argument("--jobs", type=int, help="compile processes (default: one per CPU)")
    parser.add_argument("--dim", type=int, action="append", default=[], help="only these D (repeatable)")
    parser.add_argument("--dtype", action="append", default=[], choices=sorted(DTYPES), help="only these (repeatable)")
    args = parser.parse_args()
    launches = record_launches(args.quick, args.dim, args.dtype)
    failed = False
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(launches)} launches recorded")
    for arch in args.arch or (90, 80):
        with shared_memory_of(arch):
            results = compile_launches(launches, arch, args.jobs)
        print(report(results, arch))
        found = problems(results, arch)
        stacked = sum(r.stack != 0 for r in results)
        print(f"sm_{arch}: {len(found)} problems, {stacked} of {len(results)} compiles use a stack frame (spills)")
        for line in found:
            print("  PROBLEM", line)
        for line in spilling(results, arch):
            print("  spills in every configuration:", line)
        failed |= bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
