"""What recomputing near pairs from their differences costs the CPU triplet ops: a developer's timing, not a test.

    python3 scripts/triplet_near_cost.py                  # B=4096, D=256, fp32, fwd+bwd, median of 5
    python3 scripts/triplet_near_cost.py --batch 2048 --dim 64 --repeats 15

Batches: ``random`` (no near pair), ``pairs`` (every row twice: B near pairs) and ``collapsed`` (every row within 1e-3
of one vector: every pair near, each recomputed from its D differences instead of read off the Gram matrix). Labels
B / 4 classes of four rows; euclidean distance; the default backend rule (fastloss._C where built).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastloss.functional as FF  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(args.batch, args.dim, generator=gen)
    labels = torch.arange(args.batch) // 4
    batches = {
        "random": base,
        "pairs": base[torch.arange(args.batch) // 2],
        "collapsed": base[:1] + 1e-3 * base,
    }
    losses = {"batch_hard": FF.batch_hard_triplet_loss, "batch_all": FF.batch_all_triplet_loss}
    for name, x in batches.items():
        for kind, fn in losses.items():
            times = []
            for _ in range(args.repeats):
                leaf = x.clone().requires_grad_(True)
                start = time.perf_counter()
                fn(leaf, labels, 5.0).backward()
                times.append(time.perf_counter() - start)
            print(f"{name:10s} {kind:11s} fwd+bwd median {statistics.median(times) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
