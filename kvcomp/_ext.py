"""Lazy, cached loader of the optional native extension ``kvcomp._C``.

Nothing here runs at ``import kvcomp``: the extension is imported on the first ``load_ext()`` /
``has_ext()`` call and never compiled at run time. Importing it registers the operators
``torch.ops.kvcomp_C.*`` (CPU host-mirror ops; ``gather_tokens_uva`` when built with CUDA) and this
module adds their fake (meta) implementations so ``torch.compile`` can trace calls to them.

Build it with ``KVCOMP_BUILD_EXT=1 pip install --no-build-isolation -e .`` (see setup.py).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

__all__ = ["load_ext", "has_ext", "ext_ops", "cpu_isa", "BUILD_HINT"]

BUILD_HINT = (
    "reinstall with KVCOMP_BUILD_EXT=1 pip install --no-build-isolation -e . "
    "(needs cmake, a C++20 compiler and `pip install pybind11`; CUDA ops also need nvcc and a CUDA torch)"
)


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("KVCOMP_DISABLE_EXT", "").strip() == "1":
        return None, "disabled by KVCOMP_DISABLE_EXT=1"
    import torch  # the extension links against libtorch: load it first

    try:
        mod = importlib.import_module("kvcomp._C")
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    _register_fakes(torch, mod)
    return mod, ""


def _register_fakes(torch, mod: ModuleType) -> None:
    """Shape-only implementations of the native ops, for torch.compile / FakeTensor tracing."""
    lib = "kvcomp_C"

    def fake_none(*args, **kwargs):
        return None

    def fake_attention(q, k, v, idx, count, block_table, scale):
        return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))

    def fake_status(src, idx, out, block_table=None):
        return idx.new_empty((1,), dtype=torch.int32)

    fakes = {
        "gather_tokens": fake_none,
        "scatter_tokens": fake_none,
        "sparse_attention": fake_attention,
        "gather_tokens_uva": fake_status,
    }
    for name, fn in fakes.items():
        if hasattr(getattr(torch.ops, lib), name):
            try:
                torch.library.register_fake(f"{lib}::{name}", fn)
            except RuntimeError:  # already registered (module reloaded in the same process)
                pass


def load_ext() -> ModuleType:
    """Return the native module ``kvcomp._C``, importing it on first use.

    Raises:
        RuntimeError: the extension was not built (or cannot be loaded), with the reason and the
            command that builds it.
    """
    mod, why = _load()
    if mod is None:
        raise RuntimeError(f"kvcomp native extension not built: {BUILD_HINT}. Import failed with: {why}")
    return mod


def has_ext() -> bool:
    """True when ``kvcomp._C`` is importable (imports it on first call; never compiles)."""
    return _load()[0] is not None


def ext_ops():
    """The registered native operators, ``torch.ops.kvcomp_C`` (raises like ``load_ext``)."""
    load_ext()
    import torch

    return torch.ops.kvcomp_C


def cpu_isa() -> str | None:
    """The ISA the native CPU kernels run with (``generic`` / ``avx2`` / ``avx512``: the best the CPU has,
    lowered by ``KVCOMP_CPU_ISA`` or ``kvcomp._C.set_cpu_isa``), or None without the extension.

    Raises:
        ValueError: ``KVCOMP_CPU_ISA`` is set to an unknown name.
    """
    mod, _ = _load()
    return None if mod is None else mod.cpu_isa()
