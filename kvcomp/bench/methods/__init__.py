"""Per-method benches; importing this package registers all of them (CPU sweep order: full attention
first, since every row's speedups are relative to ``sdpa`` and ``off``)."""

from kvcomp.bench.core import CPU_CASES, REGISTRY
from kvcomp.bench.methods import dense, duo, think, vq  # noqa: F401  (registration)

__all__ = ["CPU_CASES", "REGISTRY"]
