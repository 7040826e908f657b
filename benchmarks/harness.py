"""Timing, peak memory and the environment of a benchmark run.

Time: ``triton.testing.do_bench`` on CUDA (median and 20/80 quantiles); on CPU a wall-clock loop over rounds
that call every implementation of a case once each (``time.perf_counter`` around each call, at least ``min_reps``
rounds and as many more as fit the budget), so that load changes on a shared CPU hit all implementations alike.

Peak memory of the loss stage beyond its inputs:
- CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around one fwd+bwd (peak stats reset first).
- CPU (Linux): the process's resident-set high-water mark, in a fresh process (benchmarks/memory.py) whose glibc
  serves every block of 256 KiB or more with mmap and returns it on free. Free heap pages are dropped
  (``malloc_trim(0)``), the kernel's peak counter is reset (``echo 5 > /proc/self/clear_refs`` sets VmHWM to
  VmRSS), one fwd+bwd runs, and VmHWM - VmRSS(before) is the peak. It counts every allocation (torch's allocator,
  the native extension's own buffers, OpenMP scratch), at page granularity.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import functools
import gc
import os
import platform
import re
import statistics
import subprocess
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MMAP_THRESHOLD = 256 * 1024
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1


@dataclass
class Timing:
    ms: float
    q20_ms: float
    q80_ms: float
    reps: int


def quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) with linear interpolation."""
    xs = sorted(samples_ms)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return statistics.median(xs), q(0.2), q(0.8)


def time_cpu_interleaved(
    calls: dict[str, tuple[Callable[[], object] | None, Callable]],
    *,
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 50,
    budget_s: float = 1.0,
    long_call_s: float = 5.0,
) -> dict[str, Timing | Exception]:
    """Wall-clock times of several implementations of one case, in rounds (one call of each per round), so that a
    change of load on a shared CPU hits all of them alike. ``calls[name] = (setup, fn)``: ``fn(setup())`` is timed,
    ``setup`` is not (None: ``fn()``). ``budget_s`` is per implementation; one that raises is dropped and its
    exception returned. An implementation whose warm-up call took more than ``long_call_s`` is timed once (its
    record's ``reps`` says so): sentence-transformers under bf16 autocast took 25 s a call at the CPU target shape
    on an AVX2 CPU, where three timed calls more would have said the same."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    failed: dict[str, Exception] = {}
    long_calls: set[str] = set()

    def one(name: str, timed: bool) -> None:
        setup, fn = calls[name]
        try:
            arg = setup() if setup is not None else None
            t0 = time.perf_counter()
            fn(arg) if setup is not None else fn()
            seconds = time.perf_counter() - t0
            if timed:
                samples[name].append(seconds * 1e3)
            elif seconds > long_call_s:
                long_calls.add(name)
        except Exception as exc:  # noqa: BLE001 - reported per implementation
            failed[name] = exc

    for _ in range(warmup):
        for name in calls:
            if name not in failed:
                one(name, False)
    start, rounds = time.perf_counter(), 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < budget_s * len(calls)):
        live = [name for name in calls if name not in failed and not (name in long_calls and samples[name])]
        if not live:
            break
        for name in live:
            one(name, True)
        rounds += 1
    out: dict[str, Timing | Exception] = {}
    for name in calls:
        if name in failed:
            out[name] = failed[name]
        else:
            ms, q20, q80 = quantiles(samples[name])
            out[name] = Timing(ms, q20, q80, len(samples[name]))
    return out


def time_cuda(fn: Callable[[], object], *, grad_to_none=None, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    from triton.testing import do_bench

    ms, q20, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return Timing(float(ms), float(q20), float(q80), -1)


# ---------------------------------------------------------------------------------------------------------------
# peak memory


@functools.lru_cache(maxsize=1)
def setup_cpu_allocator() -> bool:
    """Pin glibc's mmap threshold (see the module docstring); False where that is not possible."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        libc.mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD)
        return ok
    except OSError:
        return False


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@functools.lru_cache(maxsize=1)
def rss_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def cpu_memory_method() -> str | None:
    if not rss_peak_supported():
        return None
    pinned = setup_cpu_allocator()
    return "rss_hwm" + ("" if pinned else "_unpinned")


def peak_cpu_mib(fn: Callable[[], object]) -> float | None:
    """Resident-set growth (MiB) at the peak of one call of ``fn``, beyond what is live before it."""
    if not rss_peak_supported():
        return None
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(0, _status_kib("VmHWM") - base) / 1024.0


def peak_cuda_mib(fn: Callable[[], object], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ---------------------------------------------------------------------------------------------------------------
# environment


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of tensor storages that torch ops create under the mode and that are still alive, and their peak:
    the accounting of torch.cuda.max_memory_allocated (without the allocator's rounding) on any device. A storage
    counts from the op that creates it until the last tensor of it dies; results that share an argument's storage
    (views, in-place ops) add nothing."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage -> [tensors alive, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key not in self._storages:
                if key in known:
                    continue
                self._storages[key] = [0, t.untyped_storage().nbytes()]
                self.live += self._storages[key][1]
                self.peak = max(self.peak, self.live)
            self._storages[key][0] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self._storages[key]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block only
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str] | None:
    """parse_cpuinfo of this machine's /proc/cpuinfo (None where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return None


def cpu_model() -> str:
    return (_cpuinfo() or {}).get("model name") or platform.processor() or platform.machine()


# the x86 extensions that decide how fast the native kernels and torch's GEMMs run (F16C: fp16 rows; AVX-512 /
# AVX-512-BF16 / AMX-BF16: MKL's GEMMs and the bf16 path of FASTLOSS_NATIVE_BF16_GEMM)
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def identity_of(fields: dict[str, str]) -> str | None:
    """``<vendor> <family>/<model>/<stepping> <flags of ISA_FLAGS>`` of parse_cpuinfo's fields (None without a
    vendor), e.g. ``AuthenticAMD 25/1/1 avx2 fma f16c``."""
    if "vendor_id" not in fields:
        return None
    flags = set(fields.get("flags", "").split())
    ident = "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return " ".join([fields["vendor_id"], ident, *(f for f in ISA_FLAGS if f in flags)])


def cpu_identity() -> str | None:
    """The CPU as the ``cpu`` key of CPU records: more than the model name of device_name, which a hypervisor may
    cut to "AMD EPYC" for different CPUs (one file, cpu-amd-epyc-2c.json, holds the records of each then)."""
    fields = _cpuinfo()
    return identity_of(fields) if fields is not None else platform.processor() or None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    """``cpu-<model>-<n>c`` or ``cuda-<gpu name>``: the results file is ``results/<device_name>.json``."""
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    model = _slug(cpu_model())
    model = re.sub(r"-(processor|cpu|\d+-core)\b.*$", "", model) or "unknown"
    return f"cpu-{model}-{cpu_count()}c"


# Where the suite writes its records and plots: changes there are its own output, not the code it measured, so they do
# not make a commit "-dirty" (a second run after a first one's records would otherwise say it measured other code).
RESULTS_PATHSPEC = ":(top,exclude)benchmarks/results"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD's short hash, with "-dirty" where tracked files outside benchmarks/results differ from it; None outside
    a git checkout."""
    return commit_of(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def commit_of(root: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            return None
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", RESULTS_PATHSPEC],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def record_env(device: torch.device) -> dict:
    """The keys of a record that say where and with what it ran (``cpu`` on CPUs only)."""
    env = {"device": device_name(device), **versions(), "commit": git_commit()}
    if device.type == "cpu":
        env["cpu"] = cpu_identity()
    return env


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
