"""Compatibility names for scripts that import ``bench.registry``: the benchmark registry moved into the
installed package (``kvcomp.bench.core``: problems, timing, byte model; ``kvcomp.bench.methods``: one
module per method), so ``kvcomp bench kernels`` works from an installed kvcomp."""

from kvcomp.bench.core import (CPU_CASES, LLAMA31_8B, PEAK_GBPS, REGISTRY, Baseline, Bench, CpuCase, Problem,
                               peak_gbps, register, register_cpu)
from kvcomp.bench.methods import dense, duo, think, vq  # noqa: F401  (registration)

__all__ = ["CPU_CASES", "LLAMA31_8B", "PEAK_GBPS", "REGISTRY", "Baseline", "Bench", "CpuCase", "Problem", "peak_gbps",
           "register", "register_cpu"]
