"""``python -m benchmarks``: run a suite, merge its records into results/<device>.json, plot, print the summary."""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks import harness, report, runner, suites
from benchmarks.cases import IMPLS, OPS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--gpu", action="store_true", help="the GPU sweep (default when CUDA is available)")
    where.add_argument("--cpu", action="store_true", help="the CPU suite even where CUDA is available")
    ap.add_argument("--quick", action="store_true", help="tiny shapes only (a smoke test: seconds)")
    ap.add_argument("--ops", help=f"comma list, a subset of: {','.join(OPS)}")
    ap.add_argument("--impls", help=f"comma list, a subset of: {','.join(IMPLS)}")
    ap.add_argument("--dtypes", help="comma list of fp32,bf16,fp16")
    ap.add_argument("--groups", help="comma list of case groups: batch,target,dim,dtype")
    ap.add_argument("--modes", help="comma list of fwd,bwd,fwd+bwd (default: fwd+bwd on CPU, all three on GPU)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch_compile cases")
    ap.add_argument(
        "--max-batch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="search the largest MNRL batch that fits (D=1024 bf16; default on with the GPU sweep)",
    )
    ap.add_argument("--max-batch-limit", type=int, default=1 << 20, help="stop the search at this B")
    ap.add_argument(
        "--max-batch-start",
        type=int,
        default=4096,
        help="the first B tried; the search doubles from it (set it to the limit to ask in one call whether the "
        "limit fits, bisecting down only if not)",
    )
    ap.add_argument("--budget", type=float, help="CPU: seconds of repetitions per timing, min 3 reps (0.5; quick 0.2)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument(
        "--time-limit", type=float, help="seconds: start no further case after this (the records so far are kept)"
    )
    ap.add_argument("--allow-mismatch", action="store_true", help="time impls that fail the check (flagged)")
    ap.add_argument("--out", default=RESULTS, help="results directory (default benchmarks/results)")
    ap.add_argument("--fresh", action="store_true", help="replace the device's JSON instead of merging into it")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="plot and print the device's existing records")
    ap.add_argument(
        "--device", help="with --report-only: another machine's records (e.g. cuda-nvidia-h200) instead of this one's"
    )
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def select_cases(args, device: torch.device) -> list[suites.Case]:
    if args.quick:
        cases = suites.quick()
    elif device.type == "cuda":
        cases = suites.gpu_default(not args.no_compile)
    else:
        cases = suites.cpu_default(not args.no_compile)
    ops, impls, dtypes, groups = _csv(args.ops), _csv(args.impls), _csv(args.dtypes), _csv(args.groups)
    for name, allowed, universe in (("ops", ops, OPS), ("impls", impls, IMPLS), ("dtypes", dtypes, runner.DTYPES)):
        bad = set(allowed or ()) - set(universe)
        if bad:
            raise SystemExit(f"--{name}: unknown {sorted(bad)}; choose from {list(universe)}")
    out = []
    for c in cases:
        keep = [i for i in c.impls if not impls or i in impls]
        if (ops and c.op not in ops) or (dtypes and c.dtype not in dtypes) or (groups and c.group not in groups):
            continue
        if keep:
            out.append(suites.Case(c.op, c.B, c.N, c.D, c.dtype, tuple(keep), c.group))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.cpu
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available here")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if args.device and not args.report_only:
        raise SystemExit("--device: only with --report-only (a run records the machine it runs on)")
    name = args.device or harness.device_name(device)
    path = os.path.join(args.out, f"{name}.json")
    if args.report_only:
        records = runner.load_records(path)
        _finish(records, records, args, name, None)
        return 0

    cases = select_cases(args, device)
    if args.list:
        for c in cases:
            print(f"{c.op:32s} B={c.B:<6d} N={c.N:<6d} D={c.D:<5d} {c.dtype:5s} {c.group:7s} {','.join(c.impls)}")
        return 0
    modes = tuple(_csv(args.modes) or (runner.MODES if use_cuda else ("fwd+bwd",)))
    if set(modes) - set(runner.MODES):
        raise SystemExit(f"--modes: choose from {runner.MODES}")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 0.5)
    started = time.perf_counter()
    print(
        f"fastloss benchmarks on {name} ({harness.cpu_model() if not use_cuda else torch.cuda.get_device_name()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(cases)} cases, modes {','.join(modes)}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    opts = runner.Options(
        device=device,
        modes=modes,
        budget_s=budget,
        seed=args.seed,
        allow_mismatch=args.allow_mismatch,
        memory=not args.no_memory,
    )
    run = runner.Runner(opts)
    # the records are saved after every case, so a sweep stopped part-way (a device lease ending) keeps its numbers
    records = run.run(cases, lambda recs: runner.save_records(path, recs, fresh=args.fresh), args.time_limit)
    search = args.max_batch if args.max_batch is not None else (use_cuda and not args.quick)
    if search:
        if not use_cuda:
            print("max-batch search: needs CUDA (OOM is the signal); skipped")
        else:
            for impl in ("fastloss", "sentence_transformers", "inf_cl", "cce_exact"):
                if args.impls and impl not in _csv(args.impls):
                    continue
                try:
                    records.append(
                        runner.max_batch_search(
                            "mnrl", impl, 1024, "bf16", opts, start=args.max_batch_start, limit=args.max_batch_limit
                        )
                    )
                except Exception as exc:  # noqa: BLE001 - e.g. a peer that is not importable
                    print(f"max-batch search mnrl/{impl}: skipped ({type(exc).__name__}: {exc})")
    all_records = runner.save_records(path, records, fresh=args.fresh)
    _finish(records, all_records, args, name, run.skipped)
    print(
        f"records: {path} ({len(records)} new, {len(all_records)} in the file); "
        f"wall time {time.perf_counter() - started:.1f} s; load average {os.getloadavg()[0]:.2f}"
    )
    return 0


def _finish(records, all_records, args, name: str, skipped) -> None:
    print()
    print(report.summary_table(records))
    for line in report.targets_report(records):
        print(line)
    mixed = report.machines_line(all_records)
    if mixed:
        print(mixed)
    if skipped:
        print("\nskipped:")
        for note in skipped:
            print(f"  {note}")
    if not args.no_plot:
        for p in report.plot(all_records, args.out, name):
            print(f"plot: {p}")


if __name__ == "__main__":
    raise SystemExit(main())
