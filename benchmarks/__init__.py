"""Benchmarks: each measures a baseline in the same run and prints ratios. Run them from the repository root as
modules, `python -m benchmarks.NAME` (`--quick`: the whole path at toy sizes, what `make test` runs)."""
