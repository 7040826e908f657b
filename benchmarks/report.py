"""The summary table and the plots, both drawn from records (a run's, or a results JSON file's)."""

from __future__ import annotations

import os
from collections import defaultdict

from benchmarks.cases import IMPLS

ORDER = {name: i for i, name in enumerate(IMPLS)}
# the issue's GPU target shape (MNRL one direction, set for an H100), its least effective TFLOP/s (8 B N D FLOP) and
# most time as a multiple of the GEMM floor's
GPU_TARGET_SHAPE, GPU_MIN_TFLOPS, GPU_MAX_FLOOR_RATIO = (32768, 65536, 1024, "bf16"), 400.0, 1.5
# fastloss's MNRL impls: the default dispatch, and the row-block and flash algorithms forced (FASTLOSS_MNRL_ALGO)
FASTLOSS_MNRL = ("fastloss", "fastloss_blocked", "fastloss_flash")
# the "vs ST" column's sentence-transformers row, where it is not sentence_transformers: the same autocast
ST_BASELINE = {"fastloss_autocast": "st_autocast"}
TARGETS = (
    # (label, device type, op, B, N, D, dtype, min speedup over sentence-transformers, max share of its extra memory)
    (
        "native CPU target: MNRL fwd+bwd, (query, positive, 1 hard negative), D=256 fp32",
        "cpu",
        "mnrl",
        4096,
        8192,
        256,
        "fp32",
        1.25,
        0.10,
    ),
    (
        "GPU target (issue 5, set for an H100): MNRL fwd+bwd, one direction, D=1024 bf16",
        "cuda",
        "mnrl",
        *GPU_TARGET_SHAPE,
        3.0,
        0.01,
    ),
)


def _fmt(x, spec: str, dash: str = "-") -> str:
    return dash if x is None else format(x, spec)


def _shape_key(r: dict) -> tuple:
    return (r["op"], r["dtype"], r["D"], r["N"] // r["B"] if r.get("B") and r.get("N") else 0, r["B"] or 0, r["N"] or 0)


def summary_table(records: list[dict]) -> str:
    """One row per record of a timed case: ms (q20-q80), peak MiB, and fastloss against sentence-transformers and
    the GEMM floor at the same shape."""
    recs = [r for r in records if r.get("group") != "max_batch"]
    by_shape: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in recs:
        by_shape[_shape_key(r)][r["impl"]] = r
    head = (
        "op",
        "B",
        "N",
        "D",
        "dtype",
        "impl",
        "backend",
        "ms fwd+bwd",
        "q20-q80",
        "peak MiB",
        "vs ST",
        "mem/ST",
        "/floor",
        "TFLOP/s",
        "check",
    )
    rows = [head]
    for key in sorted(by_shape):
        impls = by_shape[key]
        floor = impls.get("gemm_floor")
        for name in sorted(impls, key=lambda n: ORDER.get(n, 99)):
            r, st = impls[name], impls.get(ST_BASELINE.get(name, "sentence_transformers"))
            ms = r.get("ms")
            speed = mem = ratio = None
            vs_st = name not in ("sentence_transformers", "gemm_floor")
            if ms and st and st.get("ms") and vs_st:
                speed = st["ms"] / ms
            if r.get("peak_mib") is not None and st and st.get("peak_mib") and vs_st:
                mem = r["peak_mib"] / st["peak_mib"]
            if ms and floor and floor.get("ms") and name != "gemm_floor":
                ratio = ms / floor["ms"]
            q = f"{r['q20_ms']:.1f}-{r['q80_ms']:.1f}" if r.get("q20_ms") is not None else "-"
            rows.append(
                (
                    r["op"],
                    str(r["B"]),
                    str(r["N"]),
                    str(r["D"]),
                    r["dtype"],
                    name,
                    str(r.get("backend") or "-"),
                    _fmt(ms, ".2f", r.get("error") or "-"),
                    q,
                    _fmt(r.get("peak_mib"), ".1f"),
                    _fmt(speed, ".2f") + ("x" if speed else ""),
                    _fmt(mem, ".1%"),
                    _fmt(ratio, ".2f"),
                    _fmt(r.get("tflops"), ".3g"),
                    str(r.get("check") or "-"),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.rjust(w) if j in (1, 2, 3, 7, 9, 10, 11, 12, 13) else c.ljust(w)
            for j, (c, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    searches = [r for r in records if r.get("group") == "max_batch"]
    for r in searches:
        s = r.get("search", {})
        lines.append(
            f"max batch {r['op']}/{r['impl']} D={r['D']} {r['dtype']}: B={r['B']} "
            f"(peak {_fmt(r.get('peak_mib'), '.0f')} MiB; stopped by {s.get('stopped_by')}, "
            f"first OOM at {s.get('first_oom')})"
        )
    return "\n".join(lines)


HEADLINES = ((8192, 16384, 768, "bf16"), GPU_TARGET_SHAPE)  # GPU: MNRL one direction, fwd+bwd


def targets_report(records: list[dict]) -> list[str]:
    out = []
    for b, n, d, dtype in HEADLINES:
        found = {
            r["impl"]: r
            for r in records
            if r["device"].startswith("cuda")
            and r["op"] == "mnrl"
            and (r["B"], r["N"], r["D"], r["dtype"]) == (b, n, d, dtype)
            and r.get("group") != "max_batch"
        }
        floor = found.get("gemm_floor", {}).get("ms")
        parts = []
        for name in sorted(found, key=lambda x: ORDER.get(x, 99)):
            r = found[name]
            if not r.get("ms"):
                parts.append(f"{name} {r.get('error') or r.get('check') or '-'}")
                continue
            tflops = 8.0 * b * n * d / (r["ms"] * 1e-3) / 1e12
            text = f"{name} {r['ms']:.2f} ms = {tflops:.0f} TFLOP/s"
            if floor and name != "gemm_floor":
                text += f" ({r['ms'] / floor:.2f}x the floor)"
            if name in FASTLOSS_MNRL and (b, n, d, dtype) == GPU_TARGET_SHAPE:
                if tflops < GPU_MIN_TFLOPS or (floor and r["ms"] / floor > GPU_MAX_FLOOR_RATIO):
                    verdict = "NOT met"
                else:
                    verdict = "met" if floor else "TFLOP/s met, no floor measured"
                text += f" [targets >= {GPU_MIN_TFLOPS:.0f} TFLOP/s, <= {GPU_MAX_FLOOR_RATIO}x the floor: {verdict}]"
            parts.append(text)
        if parts:
            out.append(f"MNRL fwd+bwd B={b} N={n} D={d} {dtype} (8BND FLOP): " + "; ".join(parts))
    for label, dev, op, b, n, d, dtype, min_speed, max_mem in TARGETS:
        found = {
            r["impl"]: r
            for r in records
            if r["device"].startswith(dev)
            and r["op"] == op
            and r["B"] == b
            and r["N"] == n
            and r["D"] == d
            and r["dtype"] == dtype
            and r.get("group") != "max_batch"
        }
        st = found.get("sentence_transformers")
        for name in FASTLOSS_MNRL if dev == "cuda" else ("fastloss",):  # CPU: the forced algorithms are not targets
            fl = found.get(name)
            if fl and st and fl.get("ms") and st.get("ms"):
                out.append(_target_line(label, name, fl, st, min_speed, max_mem))
    return out


def _target_line(label: str, name: str, fl: dict, st: dict, min_speed: float, max_mem: float) -> str:
    speed = st["ms"] / fl["ms"]
    line = f"{label}: {name} [{fl.get('backend')}] {fl['ms']:.1f} ms vs sentence-transformers {st['ms']:.1f} ms"
    line += f" = {speed:.2f}x (target >= {min_speed}x: {'met' if speed >= min_speed else 'NOT met'})"
    if fl.get("peak_mib") is not None and st.get("peak_mib"):
        share = fl["peak_mib"] / st["peak_mib"]
        line += (
            f"; extra memory {fl['peak_mib']:.1f} MiB = {share:.1%} of its {st['peak_mib']:.1f} MiB "
            f"(target <= {max_mem:.0%}: {'met' if share <= max_mem else 'NOT met'})"
        )
        grads = fl.get("grad_mib")
        if grads is not None and st["peak_mib"] > grads:  # the same inputs, so the same gradients, in both
            work = max(0.0, fl["peak_mib"] - grads) / (st["peak_mib"] - grads)
            line += f"; beyond the inputs' gradients ({grads:.1f} MiB, which both allocate) {work:.1%}"
    return line


def machines_line(records: list[dict]) -> str | None:
    """A note where a file's CPU records come from more than one CPU (their ``cpu`` key; records from before the
    key count as one CPU, unrecorded): a hypervisor may give different CPUs one model name, so one file name."""
    cpus: dict[str, int] = defaultdict(int)
    for r in records:
        if str(r.get("device", "")).startswith("cpu-"):
            cpus[r.get("cpu") or "unrecorded"] += 1
    if len(cpus) < 2:
        return None
    parts = ", ".join(f"{n} from {cpu}" for cpu, n in sorted(cpus.items(), key=lambda kv: -kv[1]))
    return f"note: the file's CPU records come from {len(cpus)} CPUs ({parts}); compare times within one `cpu` only"


def _plot_groups(records: list[dict]) -> dict[str, list[dict]]:
    """Per op, the records of its largest batch sweep: the (D, dtype, N/B) with the most distinct batch sizes."""
    by_op: dict[str, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("group") == "max_batch" or not r.get("B"):
            continue
        by_op[r["op"]][(r["D"], r["dtype"], r["N"] // r["B"])].append(r)
    out = {}
    for op, groups in by_op.items():
        key = max(groups, key=lambda k: (len({r["B"] for r in groups[k]}), len(groups[k])))
        out[op] = groups[key]
    return out


def plot(records: list[dict], out_dir: str, device: str) -> list[str]:
    """One PNG per op: time and peak memory against B (log-log), one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op, recs in sorted(_plot_groups(records).items()):
        d, dtype, ratio = recs[0]["D"], recs[0]["dtype"], recs[0]["N"] // recs[0]["B"]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for impl in sorted({r["impl"] for r in recs}, key=lambda n: ORDER.get(n, 99)):
            pts = sorted((r["B"], r.get("ms"), r.get("peak_mib")) for r in recs if r["impl"] == impl)
            style = dict(marker="o", linestyle="--" if impl == "gemm_floor" else "-", label=impl)
            t = [(b, ms) for b, ms, _ in pts if ms]
            m = [(b, mib) for b, _, mib in pts if mib]
            if t:
                ax_t.plot(*zip(*t), **style)
            if m:
                ax_m.plot(*zip(*m), **style)
        for ax, ylabel in ((ax_t, "fwd+bwd time, median (ms)"), (ax_m, "peak memory beyond inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        n = "B" if ratio == 1 else f"{ratio}B"
        fig.suptitle(f"{op}: N = {n}, D = {d}, {dtype} — {device}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{device}_{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
