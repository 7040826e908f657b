"""pytest-benchmark wrappers of the suite's cases, at tiny shapes: ``pytest benchmarks/``.

Each test checks its implementation against sentence-transformers (fp64) first, then times one fwd+bwd with the
``benchmark`` fixture (``--benchmark-json`` etc. work as usual). Use ``python -m benchmarks`` for real numbers.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import runner
from benchmarks.cases import OPS, Impl, Skip, op_available
from benchmarks.runner import ORACLE, ORACLE_AUTOCAST, Checker, Options
from benchmarks.suites import Case

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
SHAPES = {"mnrl": (64, 128), "mnsrl": (64, 64), "gte": (64, 128), "gradcache_step": (128, 256)}
TESTED = (
    "fastloss",
    "fastloss_blocked",
    ORACLE,
    "gemm_floor",
    "inf_cl",
    "cce_exact",
    "fastloss_autocast",
    ORACLE_AUTOCAST,
)
PARAMS = [
    pytest.param(op, impl, id=f"{op}-{impl}")
    for op, spec in OPS.items()
    for impl in spec.impls
    if impl in TESTED or (impl == "fastloss_flash" and DEVICE.type == "cuda")  # elsewhere the same path as fastloss
]


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker(Options(device=DEVICE, log=lambda _msg: None))


@pytest.mark.parametrize("op, impl", PARAMS)
def test_fwd_bwd(benchmark, checker, op, impl):
    missing = op_available(op, DEVICE)
    if missing:
        pytest.skip(missing)
    spec = OPS[op]
    B, N = SHAPES.get(op, (64, 64))
    case = Case(op, B, N, 32, "fp32", (impl,))
    try:
        p = spec.make(B, N, 32, torch.float32, DEVICE, 0)
        run = spec.impls[impl](p)
    except Skip as exc:
        pytest.skip(str(exc))
    if run.is_loss and impl not in (ORACLE, ORACLE_AUTOCAST):  # the baselines are not refused
        result = checker.check(spec, impl, case)
        assert result["ok"], f"{op}/{impl} does not match sentence-transformers: {result}"
    benchmark.extra_info.update(backend=run.backend, B=B, N=N, D=32, dtype="fp32")

    def step():
        for x in p.inputs:
            x.grad = None
        run.fn().backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


def test_autocast_impls_run_the_forward_under_autocast():
    """fastloss_autocast and st_autocast: the loss of the fp32 problem as inside torch.autocast(bf16), checked at
    bf16's tolerance; fastloss's equals its dot-product loss on the unit vectors cast to bf16 (what it does under
    autocast)."""
    from fastloss.functional import mnrl_loss

    spec = OPS["mnrl"]
    p = spec.make(16, 32, 8, torch.float32, torch.device("cpu"), 0)
    ours, st = spec.impls["fastloss_autocast"](p), spec.impls["st_autocast"](p)
    assert ours.autocast == st.autocast == "bf16"
    cast = [torch.nn.functional.normalize(x.detach(), dim=-1).bfloat16() for x in p.inputs]
    assert torch.equal(ours.fn().detach(), mnrl_loss(cast[0], cast[1:], 20.0, similarity="dot"))
    assert not torch.equal(ours.fn().detach(), spec.impls["fastloss"](p).fn().detach())
    assert not torch.equal(st.fn().detach().float(), spec.impls[ORACLE](p).fn().detach())  # its matmul in bf16


def test_st_autocast_is_a_baseline():
    """st_autocast is timed whatever its error (sentence-transformers itself under autocast), with its errors
    against fp64 recorded; fastloss_autocast is checked."""
    opts = Options(device=torch.device("cpu"), budget_s=0.01, memory=False, log=lambda _msg: None)
    impls = (ORACLE, "fastloss_autocast", ORACLE_AUTOCAST)
    records = {r["impl"]: r for r in runner.Runner(opts).run([Case("mnrl", 16, 32, 8, "fp32", impls)])}
    assert records[ORACLE_AUTOCAST]["check"] == "oracle" and records[ORACLE_AUTOCAST]["ms"] is not None
    assert records[ORACLE_AUTOCAST]["check_loss_err"] > 0.0
    assert records["fastloss_autocast"]["check"] == "ok"


def test_cli_saves_after_each_case_and_honours_the_time_limit(tmp_path, capsys, monkeypatch):
    from benchmarks import __main__ as cli
    from benchmarks import harness, runner

    args = ["--cpu", "--quick", "--ops", "cosent", "--impls", "fastloss", "--out", str(tmp_path), "--no-plot"]
    args += ["--no-memory", "--budget", "0.01"]
    saved: list[int] = []
    real_save = runner.save_records

    def spy(path, records, fresh=False):
        saved.append(len(records))
        return real_save(path, records, fresh)

    monkeypatch.setattr(runner, "save_records", spy)
    assert cli.main(args) == 0
    n_cases = len(cli.select_cases(cli.parse_args(args), torch.device("cpu")))
    assert n_cases >= 2
    assert saved == [*range(1, n_cases + 1), n_cases]  # after each case, then the final save
    path = str(tmp_path / f"{harness.device_name(torch.device('cpu'))}.json")
    assert len(runner.load_records(path)) == n_cases
    assert {r["cpu"] for r in runner.load_records(path)} == {harness.cpu_identity()}

    # another machine's records: the plots and the table from the file alone
    other = tmp_path / "cuda-test-gpu.json"
    other.write_text(open(path).read())
    capsys.readouterr()
    assert cli.main(["--report-only", "--device", "cuda-test-gpu", "--out", str(tmp_path), "--no-plot"]) == 0
    assert "cosent" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--device"):
        cli.main([*args, "--device", "cuda-test-gpu"])

    capsys.readouterr()
    assert cli.main([*args, "--time-limit", "0", "--fresh"]) == 0
    assert "the time limit" in capsys.readouterr().out
    assert runner.load_records(path) == []


def test_long_calls_timed_once():
    """An implementation whose warm-up call outlasts long_call_s is timed once; the others as before (min_reps)."""
    import time

    from benchmarks import harness

    calls = {"fast": (None, lambda: None), "slow": (None, lambda: time.sleep(0.03))}
    out = harness.time_cpu_interleaved(calls, min_reps=3, budget_s=0.0, long_call_s=0.02)
    assert (out["fast"].reps, out["slow"].reps) == (3, 1)
    assert out["slow"].ms >= 30
    out = harness.time_cpu_interleaved(calls, min_reps=3, budget_s=0.0, long_call_s=1.0)
    assert (out["fast"].reps, out["slow"].reps) == (3, 3)


def test_commit_dirty_only_outside_results(tmp_path):
    """A record's commit says "-dirty" for changed code, not for the suite's own records and plots (a second run
    after a first one's records measured the same code)."""
    import shutil
    import subprocess

    from benchmarks import harness

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "cpu.json").write_text("[]\n")
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "start"]):
        subprocess.run([*git, *args], cwd=tmp_path, check=True, capture_output=True)
    head = harness.commit_of(str(tmp_path))
    assert head is not None and len(head) == 12
    (tmp_path / "benchmarks" / "results" / "cpu.json").write_text("[{}]\n")
    assert harness.commit_of(str(tmp_path)) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert harness.commit_of(str(tmp_path)) == head + "-dirty"
    assert harness.commit_of(str(tmp_path / "benchmarks" / "results")) == head + "-dirty"  # from any folder in it
    assert harness.commit_of(str(tmp_path.parent / "nowhere")) is None


AMD_VM = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx f16c fma avx2 sha_ni

processor\t: 1
vendor_id\t: GenuineIntel
"""


@pytest.mark.parametrize(
    "text, want",
    [
        (AMD_VM, "AuthenticAMD 25/1/1 avx2 fma f16c"),  # the first processor's block only
        (
            "vendor_id : GenuineIntel\ncpu family : 6\nmodel : 143\nstepping : 8\n"
            "flags : avx512f avx2 amx_tile amx_bf16 avx512_bf16 avx512_fp16 fma f16c\n",
            "GenuineIntel 6/143/8 avx2 fma f16c avx512f avx512_bf16 avx512_fp16 amx_bf16",
        ),
        ("vendor_id : SomeCPU\n", "SomeCPU ?/?/?"),
        ("processor : 0\nBogoMIPS : 50.00\n", None),  # no vendor line (arm64)
    ],
    ids=["amd-vm", "intel-amx", "bare", "no-vendor"],
)
def test_cpu_identity(text, want):
    """The ``cpu`` key of CPU records tells apart CPUs that share a model name (and so a results file)."""
    from benchmarks import harness

    assert harness.identity_of(harness.parse_cpuinfo(text)) == want


def test_machines_line_names_each_cpu():
    from benchmarks import report

    base = {"device": "cpu-amd-epyc-2c"}
    one = [{**base, "cpu": "AuthenticAMD 25/1/1 avx2"}] * 3
    assert report.machines_line(one) is None
    assert report.machines_line([*one, {"device": "cuda-nvidia-h200"}]) is None  # GPU records carry no cpu
    line = report.machines_line([*one, base, {**base, "cpu": "AuthenticAMD 25/17/1 avx2 avx512f"}])
    assert line is not None
    assert "3 CPUs (3 from AuthenticAMD 25/1/1 avx2, 1 from unrecorded, 1 from AuthenticAMD 25/17/1" in line


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("setting", ["native-fp32-gemms", "native-bf16-gemms", "no-native"])
@pytest.mark.parametrize("op", ["mnrl", "gte", "batch_all_triplet"])
def test_cpu_floor_of_half_inputs(monkeypatch, op, dtype, setting):
    """On CPU the floor multiplies half inputs in fp32 (backend matmul_fp32), as the native ops do, except bf16
    where the native MNRL op takes bf16 GEMMs and where there is no native op (fastloss runs torch's half GEMMs
    then)."""
    from fastloss import _backend

    module = _backend.native_module()
    if setting != "no-native" and module is None:
        pytest.skip("fastloss._C is not built")
    if setting == "native-bf16-gemms" and not module.build_info().get("mkl_bf16_gemm"):
        pytest.skip("this torch carries no MKL bf16 GEMM")
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "1" if setting == "native-bf16-gemms" else "0")
    if setting == "no-native":
        monkeypatch.setattr(_backend, "native_module", lambda: None)
    p = OPS[op].make(24, 48 if op == "mnrl" else 24, 16, dtype, torch.device("cpu"), 0)
    impl = OPS[op].impls["gemm_floor"](p)
    in_dtype = setting == "no-native" or (setting == "native-bf16-gemms" and dtype == torch.bfloat16)
    assert impl.backend == ("matmul" if in_dtype else "matmul_fp32")
    impl.fn().backward()  # runs, on the floor's own fp32 copies where it made them
    if op != "batch_all_triplet":  # (a Gram matrix's floor multiplies copies of the rows in any case)
        assert (p.inputs[0].grad is not None) == in_dtype


def test_tf32_products_checked_at_fp16_tolerance(monkeypatch):
    """fp32 cases whose products run in tf32 (an implementation's own choice; on CUDA, torch's TF32 setting or
    FASTLOSS_FP32_DOT=tf32) get fp16's tolerance, implementations under autocast their autocast's, others their
    dtype's (runner._precision, for the check at a small batch and the one at the timed shape)."""
    from fastloss import _backend

    monkeypatch.delenv("FASTLOSS_FP32_DOT", raising=False)
    monkeypatch.delenv("FASTLOSS_ALLOW_TF32", raising=False)
    monkeypatch.setattr(_backend, "triton_interpret", lambda: False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fp32, bf16 = (Case("mnrl", 64, 64, 32, dtype, ("fastloss",)) for dtype in ("fp32", "bf16"))
    plain, own = Impl(lambda: torch.zeros(())), Impl(lambda: torch.zeros(()), tf32=True)
    assert not runner._tf32_products(plain, fp32, cuda)
    assert runner._tf32_products(own, fp32, cpu) and not runner._tf32_products(own, bf16, cuda)
    assert [runner._precision(impl, fp32, cpu) for impl in (plain, own)] == ["fp32", "fp16"]
    assert runner._precision(Impl(lambda: torch.zeros(()), tf32=True, autocast="bf16"), fp32, cpu) == "bf16"
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert runner._tf32_products(plain, fp32, cuda)
        assert not runner._tf32_products(plain, fp32, cpu) and not runner._tf32_products(plain, bf16, cuda)
    finally:
        matmul.fp32_precision = before
    for value, want in (("tf32", True), ("tf32x3", False), ("ieee", False)):
        monkeypatch.setenv("FASTLOSS_FP32_DOT", value)
        assert runner._tf32_products(plain, fp32, cuda) == want, value


def test_target_lines_judge_the_gpu_targets():
    """The summary's target lines say met / NOT met for the GPU target shape, and give the memory share beyond the
    input gradients (which every implementation allocates) beside the plain one."""
    from benchmarks import report

    b, n, d, dtype = report.GPU_TARGET_SHAPE
    base = {"device": "cuda-test-gpu", "op": "mnrl", "B": b, "N": n, "D": d, "dtype": dtype, "grad_mib": 192.0}
    flops = 8.0 * b * n * d
    records = [
        {**base, "impl": "fastloss", "backend": "triton", "ms": flops / 500e12 * 1e3, "peak_mib": 392.0},
        {**base, "impl": "sentence_transformers", "ms": flops / 100e12 * 1e3, "peak_mib": 12480.0},
        {**base, "impl": "gemm_floor", "ms": flops / 600e12 * 1e3, "peak_mib": 4096.0},
    ]
    lines = "\n".join(report.targets_report(records))
    assert "fastloss" in lines and "500 TFLOP/s" in lines and "1.20x the floor" in lines
    assert "<= 1.5x the floor: met]" in lines
    assert "= 5.00x (target >= 3.0x: met)" in lines
    assert "3.1% of its 12480.0 MiB (target <= 1%: NOT met)" in lines
    assert "beyond the inputs' gradients (192.0 MiB, which both allocate) 1.6%" in lines
    records[0]["ms"] = flops / 300e12 * 1e3  # 300 TFLOP/s, 2x the floor
    assert "the floor: NOT met]" in "\n".join(report.targets_report(records))
    # each of fastloss's MNRL algorithms measured at the target gets its verdicts
    records.append({**base, "impl": "fastloss_flash", "backend": "triton", "ms": flops / 100e12 * 1e3, "peak_mib": 200})
    lines = [line for line in report.targets_report(records) if line.startswith("GPU target")]
    assert any("fastloss_flash [triton]" in line and "= 1.00x" in line for line in lines)
    assert len(lines) == 2


@pytest.mark.parametrize(
    "start,largest,calls,stopped",
    [
        (4096, 300_000, [4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288], "bisection"),
        (4096, 2_000_000, [4096 << k for k in range(9)], "limit"),
        (1 << 20, 2_000_000, [1 << 20], "limit"),
        (1 << 20, 300_000, [1 << 20, 1 << 19, 1 << 18], "bisection"),
    ],
    ids=["doubling-then-bisection", "doubling-to-the-limit", "limit-first-fits", "limit-first-bisects"],
)
def test_max_batch_search(start, largest, calls, stopped):
    """The search finds the largest fitting B to the resolution, from below (doubling) or from the limit down."""
    from benchmarks.runner import search_largest

    tried: list[int] = []

    def fits(b: int) -> tuple[bool, int]:
        tried.append(b)
        return b <= largest, b

    found, first_oom, why = search_largest(fits, start=start, limit=1 << 20, resolution=1024, time_limit_s=1e9)
    assert tried[: len(calls)] == calls and why == stopped
    want = min(largest, 1 << 20)
    if stopped == "limit":
        assert found == (want, want) and first_oom is None and len(tried) == len(calls)
    else:
        assert want - 1024 < found[0] <= want < first_oom <= found[0] + 1024


def test_memory_projection(capsys, monkeypatch):
    """benchmarks.projection on meta tensors: sentence-transformers' B x N matrices against fastloss's O(B*D) (the
    gradients, one window, O(B) vectors: the doc columns not concatenated, the normalisation backward without
    temporaries), and the largest-batch search."""
    pytest.importorskip("sentence_transformers")
    from benchmarks import projection
    from fastloss.ops import mnrl as mnrl_ops

    batch, n_docs, dim = 4096, 8192, 64
    st = projection.sentence_transformers_mib(batch, n_docs, dim, torch.bfloat16)
    assert st >= 4 * batch * n_docs * 4 / 2**20  # at least four fp32 B x N matrices alive at once
    # dscale's positive row dots run a chunk of rows at a time after the window's buffer is freed: a chunk smaller
    # than the window, as at GPU shapes (16 MiB against 128 MiB), so that the window sets the peak
    monkeypatch.setattr(mnrl_ops, "_EPILOGUE_BYTES", 256 * dim * 4)
    rows = (batch + n_docs) * dim * 2 / 2**20  # the gradients of the queries and the docs in bf16
    windowed = projection.fastloss_mib(batch, n_docs, dim, torch.bfloat16, window=1024)
    whole = projection.fastloss_mib(batch, n_docs, dim, torch.bfloat16, window=0)
    window = 1024 * dim * 4 / 2**20
    # beyond the gradients and the window, O(B) vectors only: a cat of the docs would add 1 MiB
    assert rows + window < windowed < rows + window + 8 * (batch + n_docs) * 4 / 2**20
    assert whole - windowed >= (batch - 1024) * dim * 4 / 2**20  # whole: a column's fp32 rows (the largest tensor)
    assert projection.main(["--shape", f"{batch},{n_docs},{dim}", "--gib", "1", "--max-batch-limit", "65536"]) == 0
    out = capsys.readouterr().out
    assert "fit 1 GiB: sentence-transformers " in out and "fit 1 GiB: fastloss 65536" in out


def test_memory_projection_symmetric(capsys, monkeypatch):
    """--directions: the symmetric loss (per direction, as sentence-transformers' MNSRL) on meta tensors. Its merged
    forward holds doc_to_query's partial column statistics, two fp32 parts per doc per 32 local queries (4 MiB at
    B = N = 4096), which set the peak there; without the merged forward (TRANSPOSED_FWD_BYTES = 0) they are gone. An
    unknown direction, or none that holds the positive, is refused."""
    pytest.importorskip("sentence_transformers")
    from benchmarks import projection
    from fastloss.ops import mnrl as mnrl_ops

    batch, dim = 4096, 64
    loss = dict(directions=("query_to_doc", "doc_to_query"), partition="per_direction")
    partials = 2 * 4 * (batch // 32) * batch / 2**20
    merged = projection.fastloss_mib(batch, batch, dim, torch.bfloat16, window=1024, **loss)
    monkeypatch.setattr(mnrl_ops, "TRANSPOSED_FWD_BYTES", 0)
    apart = projection.fastloss_mib(batch, batch, dim, torch.bfloat16, window=1024, **loss)
    assert partials <= merged < partials + 1.0 and apart < partials / 2
    assert projection.sentence_transformers_mib(batch, batch, dim, torch.bfloat16, **loss) > 50 * merged
    args = ["--shape", f"{batch},{batch},{dim}", "--gib", "1", "--max-batch-limit", "1024"]
    assert projection.main([*args, "--directions", "query_to_doc,doc_to_query", "--partition", "per_direction"]) == 0
    out = capsys.readouterr().out
    assert "directions query_to_doc,doc_to_query (per_direction)" in out and "row blocks" not in out
    for bad in ("query_to_query", "query_to_doc,doc_to_doc_2"):
        with pytest.raises(SystemExit):
            projection.main([*args, "--directions", bad])


def test_row_block_memory_projection():
    """benchmarks.projection's row-block op (as on CUDA, bf16; on an H200 it measured 1685.9 and 834.7 MiB beyond
    the gradients at the target with 1024 and 256 MiB blocks, what the projection gives for 30fe787's code): one
    block of logits and its bf16 G at a time, then G alone, beside the O(B*D) buffers: the docs' fp32 accumulator
    (query_to_doc alone finishes the query rows block by block; the doc columns go in uncopied), the candidate
    product's fp32 temporary and the bf16 gradients the op returns, which its backward scales into new tensors. Two
    blocks of logits alive at once (a loop variable kept the last one into the next block's product until 2026-11-30)
    exceed the bound by 2.7 MiB here."""
    from benchmarks import projection

    batch, n_docs, dim, budget = 1024, 2048, 32, 4.0
    rows_per_block = int(budget * 2**20) // (n_docs * (4 + 2))  # fp32 logits and bf16 G per row (341: 4 blocks)
    block = rows_per_block * n_docs * (4 + 2) / 2**20
    vectors = (batch + n_docs) * dim
    fixed = (n_docs * dim * 4 + n_docs * dim * 4 + 2 * vectors * 2) / 2**20
    peak = projection.blocked_mib(batch, n_docs, dim, torch.bfloat16, budget)
    assert block < peak <= block + fixed + 0.1
