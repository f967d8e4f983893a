"""Which implementation an op runs — the one dispatch rule of every ``kvcomp.ops`` entry point.

* ``triton``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (how CI runs the kernels);
* ``native``: CPU tensors when the extension ``kvcomp._C`` has the op (``torch.ops.kvcomp_C.<op>``);
* ``reference``: the pure-PyTorch reference (``kvcomp.ref``), on CPU when the extension is absent
  (one warning per process).

``KVCOMP_OPS=reference|native|triton`` forces one implementation for CPU tensors (tests and
benchmarks use it to compare them); CUDA tensors always run Triton.

A decode step asks several times per layer: the choice for CPU tensors is remembered per op and
raw values of the two environment variables (changing either, as tests do, chooses again).
"""

from __future__ import annotations

import os
import warnings

import torch

IMPLS = ("triton", "native", "reference")
ENV = "KVCOMP_OPS"
_warned = False
_chosen: dict[tuple, str] = {}  # (op, KVCOMP_OPS, TRITON_INTERPRET) -> the CPU implementation
# os.environ's own dict (encoded names; updated in place by os.environ[...] = and del): one plain
# dict read per variable and call instead of os.environ.get (~1 us each: it encodes the name)
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = (os.environ.encodekey(ENV), os.environ.encodekey("TRITON_INTERPRET")) \
    if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None


def _forced() -> str | None:
    v = os.environ.get(ENV, "").strip().lower()
    if not v:
        return None
    if v not in IMPLS:
        raise ValueError(f"{ENV} must be one of {IMPLS}, got {v!r}")
    return v


def has_native(op: str) -> bool:
    """True when ``kvcomp._C`` is loaded and registers ``torch.ops.kvcomp_C.<op>``."""
    from kvcomp._ext import has_ext

    return has_ext() and hasattr(torch.ops.kvcomp_C, op)


def impl_for(t: torch.Tensor, op: str | None = None) -> str:
    """The implementation an op runs for tensors on ``t``'s device (see the module doc).

    ``op`` names the native operator (``torch.ops.kvcomp_C.<op>``); ops without one (``None``)
    choose between Triton and the reference only.
    """
    return impl_on("cuda" if t.is_cuda else "cpu", op)  # is_cuda: a flag (``.device`` builds an object)


def impl_on(device_type: str, op: str | None = None) -> str:
    """:func:`impl_for` of a tensor on a ``device_type`` device (``"cpu"``, ``"cuda"``): no tensor
    needed (the ops' per-call dispatch)."""
    if device_type == "cuda":
        return "triton"
    if _ENV_KEYS is not None:
        key = (op, _ENV_DATA.get(_ENV_KEYS[0]), _ENV_DATA.get(_ENV_KEYS[1]))
    else:
        key = (op, os.environ.get(ENV), os.environ.get("TRITON_INTERPRET"))
    impl = _chosen.get(key)
    if impl is None:
        impl = _chosen[key] = _cpu_impl(op)
    return impl


def _cpu_impl(op: str | None) -> str:
    """:func:`impl_for` for CPU tensors, from the environment as it is now."""
    global _warned
    forced = _forced()
    if forced == "native":
        if op is None or not has_native(op):
            from kvcomp._ext import BUILD_HINT

            raise RuntimeError(f"{ENV}=native but kvcomp._C has no native {op!r} operator: {BUILD_HINT}")
        return "native"
    if forced is not None:
        return forced
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "triton"
    if op is not None:
        if has_native(op):
            return "native"
        if not _warned:
            _warned = True
            from kvcomp._ext import BUILD_HINT, has_ext

            why = f"kvcomp._C has no {op!r} operator (an old build)" if has_ext() else "kvcomp._C is not built"
            warnings.warn(f"kvcomp: {why}; CPU ops run the PyTorch references (slow): {BUILD_HINT}",
                          RuntimeWarning, stacklevel=4)
    return "reference"
