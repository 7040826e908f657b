"""Randomised comparison of fastloss's fused backends with the fp64 reference: a developer's check, not a test.

    python3 scripts/compare_backends.py                        # 300 cases, native + row-block, fp64/fp32/fp16/bf16
    TRITON_INTERPRET=1 python3 scripts/compare_backends.py --backends triton --cases 50 --dtypes fp64,fp32,fp16
    python3 scripts/compare_backends.py --device cuda --backends triton,blocked     # on a GPU machine
    python3 scripts/compare_backends.py --batches 65,130,257,300 --cases 500       # past one 64-column chunk
    python3 scripts/compare_backends.py --backends cuda-blocked --dtypes fp16,bf16   # the CUDA row-block op, emulated

Each case draws a loss (MNRL with random directions, partition, hardness mode and strength, similarity, 1-3 hard
negative columns, a float or a learnable scale from 0.05 to 100; MNSRL; CoSENT; AnglE; the four batch triplet losses
with random labels and metrics), a shape (B up to 64, or from --batches; D up to 100), special rows (a zero vector, a
duplicate row, magnitudes of 1e-3 or 1e3), for MNRL positives near or equal to their queries, and random row-block
budgets. For each dtype it rounds the inputs to that dtype and compares each backend's loss and gradients (embeddings
and a learnable scale) with the fp64 reference on the rounded inputs. A result is flagged when its error exceeds the
larger of 4x the reference's own error in that dtype (sentence-transformers' maths, same rounded inputs) and 1e-7
(fp64), 2e-4 (fp32) or 2e-2 (fp16 / bf16) of the reference's size; a backend that raises is an error. Backends:
``native`` (FASTLOSS_BACKEND=native: fastloss._C, else the CPU torch-ops fallbacks), ``blocked``
(FASTLOSS_MNRL_ALGO=blocked: the row-block MNRL op; MNRL cases only), ``triton`` (FASTLOSS_BACKEND=triton: CUDA
tensors, or CPU tensors under TRITON_INTERPRET=1), ``cuda-blocked`` (the row-block op on CPU tensors as it runs on
CUDA: fp16 / bf16 GEMM operands rounded to the input dtype, multiplied in fp32 as cuBLAS's tensor cores do, and the
Triton row passes under TRITON_INTERPRET=1, else the torch ones; the CUDA default for one-direction MNRL, which no
other CPU run takes through its half-dtype code).

Known benign flags (stop 12 went through ~3,000 cases): a result whose exact value is ~0 (D = 1, a single class, a
row with a single candidate) carries rounding noise, which a zero vector's 1/eps = 1e12 multiplies; they are counted
apart as "exact ~0". A learnable scale with masked directions (query_to_query, doc_to_doc) gets a NaN gradient from
the reference (sentence-transformers' -inf * 0), a finite one from the fused ops: not compared. Batch-hard with
cosine distance and exactly duplicated rows: where a row's hardest negative is also its farthest point, it ties with
the row's own entry plus the row maximum (sentence-transformers' "no negative" term), whose self-distance 1 - <x^,
x^> was +-1 ulp depending on the GEMM's summation order; when the maximum is tied between the duplicates, the pick
moved the gradient between them (same loss, same sum over the duplicates: stop 13, seed 21). Since stop 44 the
distance is sentence-transformers 6.3's, self-distance exactly 0, so that tie is exact on every backend. Batch-all /
semi-hard with margin 0 and duplicated rows: triplets whose exact loss is 0 (d(a, p) = d(a, n)) come out as +-1 ulp, so
whether they count as valid (> 1e-16) and enter the mean's denominator depends on the GEMM's summation order (seed
41: loss off by 0.15% in fp64; with the duplicate moved by 1e-3, equal to 1e-15). Half dtypes: a hardest pair chosen
between candidates closer than the rounding of x^ to fp16 (seed 41: a gap of 7e-6) can differ from the fp64 truth's
choice (sentence-transformers' fp16 rounds differently and may or may not match it). Generally, exactly duplicated
rows tie as candidates, and which one a backend picks follows its GEMMs' rounding (semi-hard's chosen negative,
--batches 257, seed 5): where the flagged results are gradients that agree once summed over each group of duplicates
(the loss itself passing), the flag is counted apart as "duplicate tie". Also seen on 2026-12-01, benign: euclidean
distance between exactly duplicated rows of different labels is 0 in sentence-transformers' fp32 (its squared norms
are the Gram matrix's diagonal, the same sums as the pair's product) and sqrt(|x|^2 eps) ~ 2e-3 in the native op's
(norms summed apart; seed 31001, --dtypes fp64,fp32: soft-margin loss 0.6904 for log 2); the reference's own fp64
rounding at dot logits of 5e7 (seed 31001: 2.7e-5 where the fused ops give the exact 0); and the row-block op's
merged blocks at fp32 logits of 2e4 (seed 31002, --batches 65,130,257,300: B = 130 in blocks of 128 and 2 rows),
where MKL rounds a product that two directions share differently in the two blocks' GEMMs (215 of 256 such products
at those shapes), so the partner's softmax entry moves by ulps of its logit: 6e-4 of the gradient there, and at
logits of 1e8 (seed 31001, --dtypes fp64,fp32, GTE with all_negatives, blocks of 0.01 MiB) more than the gradient
itself. Mended on 2026-12-01: the row-block and native ops merge nothing where (|scale| + |alpha|) max|x|^2 bounds
the logits beyond 1024 (MERGE_LOGIT_BOUND; seed 32002's fp32 flags of that kind, 0.5 .. 270% of the gradient on GTE-
like direction sets with rows of norm ~1e3, are gone). ``cuda-blocked`` (2026-12-02, seeds 4501 and 4502, 300 and
1000 cases, fp16 / bf16: 8 and 12 flags beyond "exact ~0"): most are the gradients of zero vectors in fp16, whose
inverse norm G holds capped at 65504 (the README's limit, as the flash kernels), so the 1e12-amplified gradient that
sentence-transformers gives (inf where it passes 65504, a finite value where the softmax entries are tiny) comes out
~1e-8 of it; others are bf16 G's rounding where a duplicated query's softmax entries cancel (seed 4501, B = 8: the
positives' gradient 600x smaller than the queries', 120% off; the native op's fp32 products 0.15%). The rounded
weighted rows' share of such flags is gone since the same day (seed 4501's fp16 case of that kind), and with the
Triton row passes (TRITON_INTERPRET=1, seed 4502: 11 such flags) a one-direction dL/dscale's; what stays there is zero
vectors, D = 1 and several-direction cases (their weighted rows still rounded, their dL/dscale from G C).
2026-12-03 (seeds 4602 and 4603, 1000 cases each, native and blocked): batch-hard's single-class flags (2 and 4 a
seed) are gone, its backward merging a row's pairs on one entry as autograd does (the gradient of that constant loss
is now exactly 0). Seen, benign: semi-hard with a row duplicated under two labels, where some d_an equals a d_ap
exactly on the fused paths (the same operands) and sentence-transformers' GEMM rounds the two an ulp apart, so its
search takes the duplicate as the semi-hard negative (a term of ~margin) where ours passes over the tie (seed 4602,
fp64: loss 5.96 against 5.33, one term of margin 5 over 8 pairs); and the native op's symmetric loss at D = 1 with a
zero query and its zero positive (seed 4601): that positive's gradient is 1e12 times a 1e-9 difference of two
softmax entries, which the native op's symmetric pass (mnrl_symmetric) takes from one G holding both directions'
entries (an O(1) doc_to_query entry added to each tiny query_to_doc one), so fp32 gives an ulp of 1 instead (-1.3e5
where sentence-transformers' fp32 has -916).
Prints one line per flag and a summary; exits 1 when a backend raised, else 0.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from collections.abc import Callable, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastloss.functional as FL  # noqa: E402

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RELATIVE = {torch.float64: 1e-7, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DIRECTIONS = ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]
BATCHES = (1, 2, 3, 5, 8, 17, 33, 64)
ENV = ("FASTLOSS_BACKEND", "FASTLOSS_MNRL_ALGO", "FASTLOSS_MNRL_BLOCK_MIB", "FASTLOSS_NATIVE_BLOCK_BYTES")


class Case:
    """One random loss configuration: ``fn(embeddings, scale) -> loss`` on fp64 ``inputs`` (CPU)."""

    def __init__(self, rng: random.Random, batches: Sequence[int] = BATCHES):
        self.rng = rng
        self.kind = rng.choice(["mnrl"] * 3 + ["mnsrl", "cosent", "angle", "hard", "soft", "all", "semi"])
        self.batch = rng.choice(batches)
        self.dim = rng.choice([1, 2, 3, 7, 16, 31, 64, 100])
        scale = rng.choice([0.05, 1.0, 20.0, 50.0, 100.0])  # 100: CLIP's largest logit scale
        self.scale: float | torch.Tensor = torch.tensor([scale]) if rng.random() < 0.3 else scale
        self.fn, self.inputs, self.text = getattr(self, "_" + self.kind)()

    def _rows(self) -> torch.Tensor:
        x = torch.randn(self.batch, self.dim, dtype=torch.float64)
        r = self.rng.random()
        if r < 0.15:
            x[self.rng.randrange(self.batch)] = 0.0
        elif r < 0.3 and self.batch > 1:
            x[self.rng.randrange(self.batch)] = x[self.rng.randrange(self.batch)]
        elif r < 0.4:
            x = x * self.rng.choice([1e-3, 1e3])
        return x

    def _mnrl_inputs(self) -> tuple[list[torch.Tensor], str]:
        columns = self.rng.choice([1, 1, 2, 3])
        inputs = [self._rows() for _ in range(columns + 1)]
        r = self.rng.random()
        if r < 0.3:  # positives close to their queries: confident rows
            inputs[1] = inputs[0] + 0.1 * torch.randn(self.batch, self.dim, dtype=torch.float64)
        elif r < 0.4:  # positives equal to their queries (SimCSE's pairs without dropout: an encoder in eval mode)
            inputs[1] = inputs[0].clone()
        similarity = self.rng.choice(["cos", "cos", "dot"])
        if similarity == "dot":  # O(1) logits, as trained models give
            inputs = [x / max(1.0, math.sqrt(self.dim)) for x in inputs]
        return inputs, similarity

    def _mnrl(self):
        inputs, sim = self._mnrl_inputs()
        # query_to_doc always (it holds the positive), the others in a random order; per_direction only where every
        # direction holds the positive (sentence-transformers rejects the rest)
        dirs = self.rng.sample(DIRECTIONS[1:], self.rng.randint(0, 3))
        dirs.insert(self.rng.randint(0, len(dirs)), "query_to_doc")
        dirs = tuple(dirs)
        partition = self.rng.choice(["joint", "per_direction"]) if set(dirs) <= set(DIRECTIONS[::2]) else "joint"
        hardness = self.rng.choice([None, None, "in_batch_negatives", "hard_negatives", "all_negatives"])
        strength = self.rng.choice([0.0, 0.5, 5.0]) if hardness else 0.0
        opts = dict(similarity=sim, directions=dirs, partition_mode=partition)
        opts.update(hardness_mode=hardness, hardness_strength=strength)
        return lambda xs, s: FL.mnrl_loss(xs[0], xs[1:], s, **opts), inputs, f"mnrl {opts}"

    def _mnsrl(self):
        inputs, sim = self._mnrl_inputs()
        return lambda xs, s: FL.mnsrl_loss(xs[0], xs[1:], s, similarity=sim), inputs, f"mnsrl similarity={sim}"

    def _pairs(self):
        values = [self.rng.choice([0.0, 0.25, 0.5, 1.0, self.rng.random()]) for _ in range(self.batch)]
        return [self._rows(), self._rows()], torch.tensor(values, dtype=torch.float64)

    def _cosent(self):
        inputs, labels = self._pairs()
        sim = self.rng.choice(["cos", "dot"])

        def fn(xs, s):
            return FL.cosent_loss(xs[0], xs[1], labels.to(xs[0].device), s, similarity=sim)

        return fn, inputs, f"cosent similarity={sim}"

    def _angle(self):
        inputs, labels = self._pairs()
        return lambda xs, s: FL.angle_loss(xs[0], [xs[1]], labels.to(xs[0].device), s), inputs, "angle"

    def _triplet(self, fn: Callable, name: str, margin: bool):
        classes = self.rng.choice([1, 2, 3, max(1, self.batch // 2), self.batch])
        labels = torch.tensor([self.rng.randrange(classes) for _ in range(self.batch)])
        metric = self.rng.choice(["euclidean", "squared_euclidean", "cosine"])
        args = (self.rng.choice([0.0, 0.5, 5.0]),) if margin else ()
        self.scale = 1.0  # no scale: a float is never compared

        def loss(xs, _s):
            return fn(xs[0], labels.to(xs[0].device), *args, distance_metric=metric)

        return loss, [self._rows()], f"{name} metric={metric} margin={args} classes={classes}"

    def _hard(self):
        return self._triplet(FL.batch_hard_triplet_loss, "batch_hard", True)

    def _soft(self):
        return self._triplet(FL.batch_hard_soft_margin_triplet_loss, "batch_hard_soft_margin", False)

    def _all(self):
        return self._triplet(FL.batch_all_triplet_loss, "batch_all", True)

    def _semi(self):
        return self._triplet(FL.batch_semi_hard_triplet_loss, "batch_semi_hard", True)

    def describe(self) -> str:
        scale = f"tensor({float(self.scale)})" if isinstance(self.scale, torch.Tensor) else self.scale
        return f"B={self.batch} D={self.dim} scale={scale} {self.text}"


def _emulate_cuda_blocked(on: bool) -> None:
    """The row-block op's CUDA choices on CPU tensors (``cuda-blocked``), or its own again."""
    from fastloss.ops import mnrl_blocked

    saved = _SAVED.setdefault("mnrl_blocked", (mnrl_blocked.half_gemms, mnrl_blocked.triton_rows))
    if on:
        mnrl_blocked.half_gemms = lambda x: x.dtype in (torch.float16, torch.bfloat16)
        mnrl_blocked.triton_rows = lambda x: os.environ.get("TRITON_INTERPRET") == "1"
    else:
        mnrl_blocked.half_gemms, mnrl_blocked.triton_rows = saved


_SAVED: dict = {}


def set_backend(name: str, rng: random.Random) -> None:
    for key in ENV:
        os.environ.pop(key, None)
    _emulate_cuda_blocked(name == "cuda-blocked")
    if name == "reference":
        os.environ["FASTLOSS_BACKEND"] = "torch"
    elif name == "native":
        os.environ["FASTLOSS_BACKEND"] = "native"
        if rng.random() < 0.5:  # rows split across native row blocks
            os.environ["FASTLOSS_NATIVE_BLOCK_BYTES"] = str(rng.choice([64, 512, 4096]))
    elif name in ("blocked", "cuda-blocked"):
        os.environ["FASTLOSS_MNRL_ALGO"] = "blocked"
        if rng.random() < 0.5:
            os.environ["FASTLOSS_MNRL_BLOCK_MIB"] = str(rng.choice([0.001, 0.01]))
    elif name == "triton":
        os.environ["FASTLOSS_BACKEND"] = "triton"
    else:
        raise ValueError(f"unknown backend {name!r}")


def run(case: Case, inputs: list[torch.Tensor], backend: str, dtype: torch.dtype, device: str, rng: random.Random):
    """[loss, grads of the inputs..., grad of a learnable scale] in fp64 (None for an unused input)."""
    set_backend(backend, rng)
    xs = [x.to(device=device, dtype=dtype).requires_grad_(True) for x in inputs]
    scale = case.scale
    leaves = list(xs)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32).clone()
        leaves.append(scale.requires_grad_(True))
    loss = case.fn(xs, scale)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [loss.detach().double().cpu()] + [None if g is None else g.double().cpu() for g in grads]


def error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    if got is None or want is None:
        return 0.0 if (got is None or not got.any()) and (want is None or not want.any()) else math.inf
    if not torch.equal(torch.isnan(got), torch.isnan(want)):
        return math.inf
    return float((torch.nan_to_num(got) - torch.nan_to_num(want)).abs().max())


def duplicate_tie(bad, got, truth, inputs, names) -> bool:
    """Whether every flagged result is the gradient of an input with exactly duplicated rows and agrees within its
    limit once each group of duplicates is summed: a tie between the duplicates that the backends' GEMM rounding
    broke differently (see the docstring); the loss itself must have passed."""
    flagged = {name: limit for name, _, limit, _ in bad}
    if "loss" in flagged or "dscale" in flagged:
        return False
    for k, x in enumerate(inputs):
        name = names[k + 1]
        if name not in flagged:
            continue
        _, group, counts = torch.unique(x, dim=0, return_inverse=True, return_counts=True)
        if int(counts.max()) < 2:
            return False
        ours, exact = (
            g.new_zeros(counts.numel(), g.shape[1]).index_add_(0, group, g) for g in (got[k + 1], truth[k + 1])
        )
        if not error(ours, exact) <= flagged[name]:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backends", default="native,blocked", help="comma list of native, blocked, triton, cuda-blocked"
    )
    parser.add_argument("--dtypes", default="fp64,fp32,fp16,bf16", help="comma list of fp64, fp32, fp16, bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batches",
        default=",".join(map(str, BATCHES)),
        help="comma list of batch sizes to draw from (larger ones reach the native ops' 64-column search chunks)",
    )
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    if unknown := sorted(set(backends) - {"native", "blocked", "triton", "cuda-blocked"}):
        parser.error(f"--backends: expected native, blocked, triton or cuda-blocked, got {unknown}")
    if unknown := sorted(set(args.dtypes.split(",")) - set(DTYPES)):
        parser.error(f"--dtypes: expected some of {', '.join(DTYPES)}, got {unknown}")
    dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        parser.error(f"--batches: expected a comma list of integers >= 1, got {args.batches!r}")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    flagged = near_zero = ties = errors = 0
    saved = {key: os.environ.get(key) for key in ENV}
    try:
        for _ in range(args.cases):
            case = Case(rng, batches)
            for dtype in dtypes:
                inputs = [x.to(dtype).double() for x in case.inputs]  # the values that dtype can hold
                try:
                    truth = run(case, inputs, "reference", torch.float64, args.device, rng)
                    low = run(case, inputs, "reference", dtype, args.device, rng) if dtype != torch.float64 else None
                except ValueError:
                    break  # a configuration sentence-transformers rejects: every backend must too (tested elsewhere)
                names = ["loss"] + [f"d{i}" for i in range(len(inputs))] + ["dscale"]
                for backend in backends:
                    if backend.endswith("blocked") and case.kind != "mnrl" and case.kind != "mnsrl":
                        continue
                    try:
                        got = run(case, inputs, backend, dtype, args.device, rng)
                    except Exception as exc:  # noqa: BLE001 - every failure is reported with its case
                        errors += 1
                        print(f"ERROR {backend} {dtype} {case.describe()}: {type(exc).__name__}: {exc}", flush=True)
                        continue
                    bad = []  # (name, error, limit, size of the exact value)
                    for i, (ours, exact) in enumerate(zip(got, truth)):
                        if exact is not None and torch.isnan(exact).any():
                            continue  # the reference's NaN dscale (see the docstring)
                        size = 0.0 if exact is None else float(exact.abs().max())
                        limit = RELATIVE[dtype] * (1e-3 + size)
                        if low is not None:
                            limit = max(limit, 4 * error(low[i], exact))
                        err = error(ours, exact)
                        if not err <= limit:
                            bad.append((names[i], err, limit, size))
                    if bad:
                        flagged += 1
                        # an exact value ~0 next to an O(1) loss: rounding noise (see the docstring)
                        exact_zero = all(size <= 1e-9 * max(1.0, float(truth[0].abs())) for *_, size in bad)
                        near_zero += exact_zero
                        tie = not exact_zero and duplicate_tie(bad, got, truth, inputs, names)
                        ties += tie
                        text = "; ".join(f"{n} err {e:.3g} > {lim:.3g} (exact size {z:.3g})" for n, e, lim, z in bad)
                        tag = " [exact ~0]" if exact_zero else " [duplicate tie]" if tie else ""
                        print(f"FLAG{tag} {backend} {dtype} {case.describe()}: {text}", flush=True)
    finally:
        _emulate_cuda_blocked(False)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    print(
        f"{args.cases} cases, seed {args.seed}, backends {backends}: {flagged} flagged ({near_zero} where the exact "
        f"value is ~0, {ties} duplicate ties), {errors} errors"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
