"""Bench tests run the kernels under the Triton CPU interpreter when there is no CUDA device (set before
any ``kernels.*`` module is imported).

The pytest-benchmark micro-benchmarks (``test_micro.py``) only check that they run, as CI's
``--benchmark-disable`` does, unless ``--benchmark-enable`` or ``--benchmark-only`` is given (timing
numbers live in ``bench/results``, never in test assertions).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # test_micro.py skips itself
    pass
else:

    @pytest.fixture
    def benchmark(benchmark, request):
        opt = request.config.option
        if not (getattr(opt, "benchmark_enable", False) or getattr(opt, "benchmark_only", False)):
            benchmark.disabled = True
        return benchmark
