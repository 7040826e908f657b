"""CPU peak memory in a fresh process: ``python -m benchmarks.memory`` reads jobs (JSON) on stdin and writes one
JSON line per job on stdout.

A fresh process because glibc serves new blocks from memory that earlier cases freed but kept resident, which
would hide their growth. This process is started with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` fixed
at 256 KiB, so from its first allocation every block of 256 KiB or more is an mmap returned on free; before each
measurement ``malloc_trim(0)`` drops the free heap pages, the op runs once untimed at a tiny shape (one-time
allocations: thread pools, library workspaces) or, for torch_compile, at the measured shape (compilation), and the
peak is ``VmHWM - VmRSS`` around one fwd+bwd (see benchmarks/harness.py).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys

THRESHOLD = str(256 * 1024)


def run_jobs(jobs: list[dict], threads: int, seed: int, timeout_s: float = 1800.0) -> list[dict]:
    """Measure ``jobs`` ({"op", "impl", "B", "N", "D", "dtype"}) in a fresh process; one result dict per job."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=THRESHOLD, MALLOC_TRIM_THRESHOLD_=THRESHOLD)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    payload = json.dumps({"jobs": jobs, "threads": threads, "seed": seed})
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory"],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=timeout_s,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            results[item.pop("i")] = item
    error = None if proc.returncode == 0 else f"memory process exited {proc.returncode}: {proc.stderr[-300:]}"
    return [results.get(i, {"error": error or "no result"}) for i in range(len(jobs))]


def main() -> int:
    import torch

    from benchmarks import harness
    from benchmarks.cases import OPS, Skip, preload
    from benchmarks.runner import DTYPES

    preload()
    request = json.load(sys.stdin)
    if request.get("threads"):
        torch.set_num_threads(request["threads"])
    harness.setup_cpu_allocator()
    method = harness.cpu_memory_method()
    device, seed = torch.device("cpu"), request["seed"]
    warmed: set[tuple] = set()

    def once(impl, p) -> None:
        for x in p.inputs:
            x.grad = None
        impl.fn().backward()
        for x in p.inputs:
            x.grad = None

    for i, job in enumerate(request["jobs"]):
        spec = OPS[job["op"]]
        dtype = DTYPES[job["dtype"]]
        out: dict = {"i": i}
        try:
            key = (job["op"], job["impl"], job["dtype"], job["N"] // job["B"])
            if job["impl"] == "torch_compile":
                p = spec.make(job["B"], job["N"], job["D"], dtype, device, seed)
                once(spec.impls[job["impl"]](p), p)
                del p
            elif key not in warmed:
                b = min(job["B"], 64)
                p = spec.make(b, b * (job["N"] // job["B"]), job["D"], dtype, device, seed)
                once(spec.impls[job["impl"]](p), p)
                del p
                warmed.add(key)
            p = spec.make(job["B"], job["N"], job["D"], dtype, device, seed)
            impl = spec.impls[job["impl"]](p)
            out["peak_mib"] = harness.peak_cpu_mib(functools.partial(once, impl, p))
            out["memory_method"] = method
            del p, impl
        except Skip as exc:
            out["error"] = f"skipped: {exc}"
        except Exception as exc:  # noqa: BLE001 - report and go on with the next job
            out["error"] = f"{type(exc).__name__}: {exc}"[:200]
        gc.collect()
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
