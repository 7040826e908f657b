"""The fastloss benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md)."""
