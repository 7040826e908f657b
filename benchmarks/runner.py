"""Runs cases: checks each loss against sentence-transformers on this machine, then times it and measures its
peak memory, and returns one record per (case, implementation)."""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from benchmarks import harness
from benchmarks.cases import DTYPES, OPS, Impl, OpSpec, Problem, Skip, op_available, preload
from benchmarks.memory import run_jobs as run_memory_jobs
from benchmarks.suites import Case
from fastloss import _backend
from fastloss.ops._autotune import TUNE_ROWS_MAX

MODES = ("fwd", "bwd", "fwd+bwd")
# relative tolerance of (loss, gradients) against the fp64 oracle; low precision also passes within 2x the error
# of sentence-transformers itself in that dtype
TOLERANCE = {"fp32": (1e-4, 1e-3), "bf16": (2e-2, 5e-2), "fp16": (5e-3, 1e-2)}
SHAPE_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
ORACLE = "sentence_transformers"
# sentence-transformers under autocast: a baseline, not a candidate; its errors against fp64 are recorded, never
# refused (under CPU bf16 autocast its cross-entropy runs in bf16: a loss 86% off at B = 96, D = 256)
ORACLE_AUTOCAST = "st_autocast"


def _precision(impl: Impl, case: Case, device: torch.device) -> str:
    """The dtype whose tolerances an implementation is checked at: its autocast's, fp16's for fp32 products in tf32
    (_tf32_products), else the case's."""
    return impl.autocast or ("fp16" if _tf32_products(impl, case, device) else case.dtype)


def _tf32_products(impl: Impl, case: Case, device: torch.device) -> bool:
    """Whether an fp32 case multiplies in tf32, and is checked at fp16's tolerance (tf32 keeps fp16's 10 mantissa
    bits): by the implementation's own choice (inf_cl), or on CUDA where torch's fp32 matmuls take TF32 (cuBLAS:
    sentence-transformers, the row-block op, the GEMM floor; the Triton kernels follow it) or FASTLOSS_FP32_DOT=tf32
    asks it of the Triton kernels."""
    if case.dtype != "fp32":
        return False
    if impl.tf32:
        return True
    dots = (_backend.torch_fp32_matmul_precision(), _backend.dot_precision(torch.float32))
    return device.type == "cuda" and "tf32" in dots


@dataclass
class Options:
    device: torch.device
    modes: tuple[str, ...] = ("fwd+bwd",)
    budget_s: float = 1.0
    min_reps: int = 3
    seed: int = 0
    allow_mismatch: bool = False
    memory: bool = True
    log: Callable[[str], None] = print


def _clear_grads(p: Problem) -> None:
    for x in p.inputs:
        x.grad = None


def is_oom(exc: BaseException) -> bool:
    """CUDA's allocator, cuBLAS workspaces and Triton launches each say 'out of memory' their own way."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "alloc_failed" in text)


def _run_once(impl: Impl, p: Problem) -> tuple[float, list[torch.Tensor | None]]:
    _clear_grads(p)
    loss = impl.fn()
    loss.backward()
    grads = [None if x.grad is None else x.grad.detach().to(torch.float64) for x in p.inputs]
    _clear_grads(p)
    return float(loss.detach().to(torch.float64)), grads


def _rel(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b) / max(abs(b), 1e-6)


def _grad_err(grads, truth) -> float:
    worst = 0.0
    for g, t in zip(grads, truth):
        if t is None and g is None:
            continue
        if t is None or g is None:
            return math.inf
        t = t.to(g.device)
        worst = max(worst, float(torch.linalg.vector_norm(g - t) / torch.linalg.vector_norm(t).clamp_min(1e-12)))
    return worst


class Checker:
    """Per (op, impl, dtype, D, columns): loss and gradients at a small shape against sentence-transformers in fp64
    (fp32 where the op's inputs cannot be fp64), cached for the run."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.cache: dict[tuple, dict] = {}

    def check(self, spec: OpSpec, impl_name: str, case: Case) -> dict:
        cols = max(1, case.N // case.B)
        key = (spec.name, impl_name, case.dtype, case.D, cols)
        if key not in self.cache:
            self.cache[key] = self._check(spec, impl_name, case, cols)
        return self.cache[key]

    def _check(self, spec: OpSpec, impl_name: str, case: Case, cols: int) -> dict:
        dev, seed = self.opts.device, self.opts.seed + 1
        b = min(case.B, spec.check_batch)
        if impl_name == "torch_compile" and case.B <= 4096:
            b = case.B  # check at the timed shape: one compilation, not two
        n = cols * b if case.N >= case.B else case.N
        dtype = DTYPES[case.dtype]
        try:
            truth_p = spec.make(b, n, case.D, torch.float64, dev, seed)
        except Skip:
            truth_p = spec.make(b, n, case.D, torch.float32, dev, seed)
        t_loss, t_grads = _run_once(spec.impls[ORACLE](truth_p), truth_p)
        p = spec.make(b, n, case.D, dtype, dev, seed)
        impl = spec.impls[impl_name](p)
        loss, grads = _run_once(impl, p)
        tol_loss, tol_grad = TOLERANCE[_precision(impl, case, dev)]
        if dtype != torch.float32 and impl_name != ORACLE:
            st_p = spec.make(b, n, case.D, dtype, dev, seed)
            st_loss, st_grads = _run_once(spec.impls[ORACLE](st_p), st_p)
            tol_loss = max(tol_loss, 2 * _rel(st_loss, t_loss))
            tol_grad = max(tol_grad, 2 * _grad_err(st_grads, t_grads))
        loss_err, grad_err = _rel(loss, t_loss), _grad_err(grads, t_grads)
        ok = loss_err <= tol_loss and grad_err <= tol_grad
        return {
            "ok": ok,
            "B": b,
            "loss_err": loss_err,
            "grad_err": grad_err,
            "tol_loss": tol_loss,
            "tol_grad": tol_grad,
        }


@dataclass
class Prepared:
    """One implementation of a case, built and checked, ready to time."""

    name: str
    rec: dict
    p: Problem
    impl: Impl
    state: dict
    is_loss: bool = True
    precision: str = "fp32"  # _precision: the tolerance of the check at the timed shape

    def step(self) -> None:
        _clear_grads(self.p)
        loss = self.impl.fn()
        loss.backward()
        self.state["loss"] = loss.detach()

    def forward(self) -> torch.Tensor:
        return self.impl.fn()

    def fresh_forward(self) -> torch.Tensor:
        _clear_grads(self.p)
        return self.impl.fn()

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    def calls(self, mode: str) -> tuple:
        if mode == "fwd":
            return None, self.forward
        if mode == "bwd":
            return self.fresh_forward, self.backward
        return None, self.step


def _put(rec: dict, mode: str, t: harness.Timing) -> None:
    prefix = "" if mode == "fwd+bwd" else mode + "_"
    rec[prefix + "ms"], rec[prefix + "q20_ms"], rec[prefix + "q80_ms"] = t.ms, t.q20_ms, t.q80_ms
    if t.reps > 0:
        rec[prefix + "reps"] = t.reps


def _time_cuda(prep: Prepared, modes: Iterable[str]) -> None:
    for mode in modes:
        if mode == "fwd":
            t = harness.time_cuda(prep.forward)
        elif mode == "bwd":
            loss = prep.fresh_forward()
            t = harness.time_cuda(lambda loss=loss: loss.backward(retain_graph=True), grad_to_none=prep.p.inputs)
            del loss
        else:
            t = harness.time_cuda(prep.step, grad_to_none=prep.p.inputs)
        _put(prep.rec, mode, t)
    if "loss" not in prep.state:
        prep.step()


def _peak(impl: Impl, p: Problem, device: torch.device) -> float | None:
    def step():
        _clear_grads(p)
        impl.fn().backward()

    if device.type == "cuda":
        return harness.peak_cuda_mib(step, device)
    return harness.peak_cpu_mib(step)


class Runner:
    def __init__(self, opts: Options):
        self.opts = opts
        self.checker = Checker(opts)
        self.env = harness.record_env(opts.device)
        self.oracle_loss: dict[tuple, float] = {}
        self.skipped: list[str] = []
        self.records: list[dict] = []

    def _base(self, case: Case, impl_name: str) -> dict:
        return {
            "op": case.op,
            "impl": impl_name,
            "B": case.B,
            "N": case.N,
            "D": case.D,
            "dtype": case.dtype,
            "ms": None,
            "peak_mib": None,
            **self.env,
            "date": harness.now_utc(),
            "group": case.group,
            "threads": torch.get_num_threads(),
            "load_1m": round(os.getloadavg()[0], 2),
        }

    def run(
        self,
        cases: list[Case],
        checkpoint: Callable[[list[dict]], object] | None = None,
        time_limit_s: float | None = None,
    ) -> list[dict]:
        """Every case in order. ``checkpoint(records)`` runs after each case, so a run killed part-way keeps what
        it measured; no case starts once ``time_limit_s`` seconds have passed (the rest are listed as skipped)."""
        preload()
        started = time.perf_counter()
        done: list[tuple[Case, str, dict]] = []
        missing: dict[str, str | None] = {}
        for i, case in enumerate(cases):
            if time_limit_s is not None and time.perf_counter() - started > time_limit_s:
                self._skip(
                    f"{len(cases) - i} cases from [{i + 1}/{len(cases)}] on: the time limit ({time_limit_s:g} s)"
                )
                break
            if case.op not in missing:
                missing[case.op] = op_available(case.op, self.opts.device)
            if missing[case.op] is not None:
                self._skip(f"{case.op} (every impl): the fastloss op is missing: {missing[case.op]}")
                continue
            for rec in self._run_case(OPS[case.op], case, f"[{i + 1}/{len(cases)}]"):
                self.records.append(rec)
                if rec["ms"] is not None:
                    done.append((case, rec["impl"], rec))
            if checkpoint is not None:
                checkpoint(self.records)
        if self.opts.memory and self.opts.device.type == "cpu":
            self._cpu_memory(done)
        return self.records

    def _problem(self, spec: OpSpec, case: Case) -> Problem:
        return spec.make(case.B, case.N, case.D, DTYPES[case.dtype], self.opts.device, self.opts.seed)

    def _prepare(self, spec: OpSpec, case: Case, impl_name: str, tag: str) -> tuple[dict | None, Prepared | None]:
        """Build and check one implementation: (record, None) when it cannot be timed, (None, None) when skipped."""
        label = f"{tag} {case.op} {impl_name} B={case.B} N={case.N} D={case.D} {case.dtype}"
        if impl_name not in spec.impls:
            self._skip(f"{case.op}/{impl_name}: not defined for this op")
            return None, None
        rec = self._base(case, impl_name)
        try:
            p = self._problem(spec, case)
            # the gradients of the inputs: part of every implementation's peak_mib (an exact loss must return them)
            rec["grad_mib"] = sum(x.numel() * x.element_size() for x in p.inputs if x.requires_grad) / 2**20
            impl = spec.impls[impl_name](p)
            rec["backend"] = impl.backend
            if impl.note:
                rec["note"] = impl.note
            if impl.is_loss and impl_name != ORACLE:
                chk = self.checker.check(spec, impl_name, case)
                baseline = impl_name == ORACLE_AUTOCAST  # recorded, never refused
                rec["check"] = "oracle" if baseline else "ok" if chk["ok"] else "FAILED"
                rec["check_loss_err"], rec["check_grad_err"] = chk["loss_err"], chk["grad_err"]
                if rec["check"] == "FAILED":
                    self.opts.log(
                        f"{label}: REFUSED, loss/grad mismatch against sentence-transformers at B={chk['B']} "
                        f"(loss err {chk['loss_err']:.2e} > {chk['tol_loss']:.1e} or grad err "
                        f"{chk['grad_err']:.2e} > {chk['tol_grad']:.1e})"
                    )
                    if not self.opts.allow_mismatch:
                        return rec, None
            elif impl_name == ORACLE:
                rec["check"] = "oracle"
            precision = _precision(impl, case, self.opts.device)
            return None, Prepared(impl_name, rec, p, impl, {}, impl.is_loss, precision)
        except Skip as exc:
            self._skip(f"{case.op}/{impl_name}: {exc}")
            return None, None
        except Exception as exc:  # noqa: BLE001 - one failing impl must not stop the suite
            rec["error"] = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:300]
            self.opts.log(f"{label}: {rec['error']}")
            return rec, None

    def _run_case(self, spec: OpSpec, case: Case, tag: str) -> list[dict]:
        t0 = time.perf_counter()
        out, ready = [], []
        for impl_name in case.impls:
            rec, prep = self._prepare(spec, case, impl_name, tag)
            if rec is not None:
                out.append(rec)
            if prep is not None:
                ready.append(prep)
        modes = self.opts.modes if case.op != "gradcache_step" else ("fwd+bwd",)
        if self.opts.device.type == "cuda":
            for prep in ready:
                try:
                    _time_cuda(prep, modes)
                    if self.opts.memory:
                        prep.rec["peak_mib"] = _peak(prep.impl, prep.p, self.opts.device)
                        prep.rec["memory_method"] = "cuda_max_memory_allocated"
                except Exception as exc:  # noqa: BLE001
                    prep.rec["error"] = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:300]
                finally:
                    prep.p = prep.impl = None
                    gc.collect()
                    torch.cuda.empty_cache()
        else:
            for mode in modes:
                live = [prep for prep in ready if "error" not in prep.rec]
                kw = {"budget_s": self.opts.budget_s, "min_reps": self.opts.min_reps}
                results = harness.time_cpu_interleaved({prep.name: prep.calls(mode) for prep in live}, **kw)
                for prep in live:
                    result = results[prep.name]
                    if isinstance(result, Exception):
                        prep.rec["error"] = f"{type(result).__name__}: {result}"[:300]
                    else:
                        _put(prep.rec, mode, result)
        for prep in sorted(ready, key=lambda x: x.name != ORACLE):
            rec = prep.rec
            if "error" in rec:
                rec["ms"] = None
            else:
                if "loss" in prep.state:
                    loss = float(prep.state["loss"].double())
                    self._shape_check(case, prep.name, prep.is_loss, rec, loss, prep.precision)
                flops = spec.flops(case.B, case.N, case.D) if spec.flops else None
                if flops and rec.get("ms"):
                    rec["tflops"] = flops / (rec["ms"] * 1e-3) / 1e12
            out.append(rec)
        for rec in out:
            extra = f" ({rec['error']})" if rec.get("error") else ""
            ms = f"{rec['ms']:.2f} ms" if rec.get("ms") is not None else "-"
            self.opts.log(
                f"{tag} {case.op} {rec['impl']} B={case.B} N={case.N} D={case.D} {case.dtype}: {ms}{extra} "
                f"[{rec.get('backend')}]"
            )
        self.opts.log(f"{tag} {time.perf_counter() - t0:.1f}s")
        return sorted(out, key=lambda r: case.impls.index(r["impl"]))

    def _shape_check(self, case: Case, impl_name: str, is_loss: bool, rec: dict, loss: float, precision: str) -> None:
        key = (case.op, case.B, case.N, case.D, case.dtype)
        if impl_name == ORACLE:
            self.oracle_loss[key] = loss
            return
        if not is_loss:
            return
        rec["loss"] = loss
        ref = self.oracle_loss.get(key)
        if ref is None:
            return
        err = _rel(loss, ref)
        rec["shape_loss_err"] = err
        if err > SHAPE_TOLERANCE[precision] and impl_name != ORACLE_AUTOCAST:
            rec["check"] = "MISMATCH_AT_SHAPE"
            self.opts.log(
                f"  flagged: {case.op}/{impl_name} loss {loss:.6g} vs sentence-transformers {ref:.6g} "
                f"(rel err {err:.2e}) at this shape"
            )

    def _skip(self, note: str) -> None:
        if note not in self.skipped:
            self.skipped.append(note)
            self.opts.log(f"skipped: {note}")

    def _cpu_memory(self, done: list[tuple[Case, str, dict]]) -> None:
        if harness.cpu_memory_method() is None:
            self.opts.log("peak memory: /proc/self/clear_refs is not writable here; peak_mib left empty")
            return
        self.opts.log(f"peak memory of {len(done)} measurements, in a fresh process ...")
        jobs = [{"op": c.op, "impl": impl, "B": c.B, "N": c.N, "D": c.D, "dtype": c.dtype} for c, impl, _ in done]
        t0 = time.perf_counter()
        results = run_memory_jobs(jobs, torch.get_num_threads(), self.opts.seed)
        for (_, _, rec), res in zip(done, results):
            if "peak_mib" in res:
                rec["peak_mib"], rec["memory_method"] = res["peak_mib"], res.get("memory_method")
            else:
                rec["memory_error"] = res.get("error")
        self.opts.log(f"peak memory: {time.perf_counter() - t0:.1f}s")


# ---------------------------------------------------------------------------------------------------------------
# the largest batch whose loss stage fits (GPU)


def search_largest(
    fits: Callable[[int], tuple],
    *,
    start: int,
    limit: int,
    resolution: int,
    time_limit_s: float,
    log: Callable[[int, bool], None] = lambda b, ok: None,
) -> tuple[tuple | None, int | None, str]:
    """Doubling from ``start`` until ``fits(B)[0]`` is False (or ``limit``), then bisection to ``resolution``.
    Returns ((B, *rest of fits(B)) of the largest B that fits or None, the smallest B that did not, why it stopped)."""
    best, lo, hi, b, began, stopped = None, 0, None, start, time.perf_counter(), "bisection"
    while True:
        ok, *rest = fits(b)
        log(b, ok)
        if ok:
            best, lo = (b, *rest), b
            if b >= limit:
                stopped = "limit"
                break
            if time.perf_counter() - began > time_limit_s:
                stopped = "time"
                break
            b = min(2 * b, limit) if hi is None else (lo + hi) // 2
        else:
            hi = b
            b = (lo + hi) // 2
        if hi is not None and hi - lo <= resolution:
            break
        b = max(resolution, b // resolution * resolution)
    return best, hi, stopped


def max_batch_search(
    op: str,
    impl_name: str,
    D: int,
    dtype: str,
    opts: Options,
    *,
    ratio: int = 1,
    start: int = 4096,
    limit: int = 1 << 20,
    resolution: int = 1024,
    time_limit_s: float = 120.0,
) -> dict:
    """Doubling then bisection on B (N = ratio * B) for one fwd+bwd that does not raise OOM."""
    spec = OPS[op]
    env = harness.record_env(opts.device)

    def fits(b: int) -> tuple[bool, float, float]:
        p = impl = None
        try:
            p = spec.make(b, ratio * b, D, DTYPES[dtype], opts.device, opts.seed)
            impl = spec.impls[impl_name](p)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            impl.fn().backward()
            torch.cuda.synchronize()
            return True, (time.perf_counter() - t0) * 1e3, (torch.cuda.max_memory_allocated() - base) / 2**20
        except Exception as exc:
            if not is_oom(exc):
                raise
            return False, math.nan, math.nan
        finally:
            del p, impl
            gc.collect()
            torch.cuda.empty_cache()

    def log(b: int, ok: bool) -> None:
        opts.log(f"max-batch {op}/{impl_name} D={D} {dtype}: B={b} {'fits' if ok else 'OOM'}")

    # starting above the largest size class of the Triton kernels' autotune keys, one untimed call at its bottom
    # first: they tune there once instead of timing every configuration at a million rows (minutes)
    if start > TUNE_ROWS_MAX:
        fits(TUNE_ROWS_MAX)
    found, hi, stopped = search_largest(
        fits, start=start, limit=limit, resolution=resolution, time_limit_s=time_limit_s, log=log
    )
    best, best_ms, best_mib = found if found else (None, None, None)
    return {
        "op": op,
        "impl": impl_name,
        "B": best,
        "N": None if best is None else ratio * best,
        "D": D,
        "dtype": dtype,
        "ms": best_ms,
        "peak_mib": best_mib,
        **env,
        "date": harness.now_utc(),
        "group": "max_batch",
        "search": {"start": start, "limit": limit, "resolution": resolution, "stopped_by": stopped, "first_oom": hi},
        "note": "largest B whose fwd+bwd fits; ms and peak of that single call",
    }


# ---------------------------------------------------------------------------------------------------------------
# records on disk


def record_key(rec: dict) -> tuple:
    return (rec["op"], rec["impl"], rec["B"], rec["N"], rec["D"], rec["dtype"], rec.get("group") == "max_batch")


def save_records(path: str, records: list[dict], fresh: bool = False) -> list[dict]:
    """Merge ``records`` into the JSON list at ``path`` (a new record replaces one with the same key)."""
    old: list[dict] = []
    if not fresh and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    merged = {record_key(r): r for r in old}
    for r in records:
        merged[record_key(r)] = r
    out = sorted(
        merged.values(),
        key=lambda r: (r["op"], r["dtype"], r["D"], r.get("group", ""), r["B"] or 0, r["N"] or 0, r["impl"]),
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(out), f, indent=1)
        f.write("\n")
    return out


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def load_records(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
