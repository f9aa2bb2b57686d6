"""pyperf-bench: kernel microbenchmarks with baselines. The harness lives here; the cases in benchmarks/bench_X.py.

A benchmarks/bench_X.py module exposes

    def cases(device: str, dtype: torch.dtype | None, quick: bool) -> list[Case]

and the harness times every impl of every case in the same run.
"""
from pyperf.bench.case import Case  # noqa: F401
