"""kvcomp's vLLM plugin: an attention backend that stores and reads compressed KV pages.

Installed with kvcomp, it is found by vLLM through the entry point
``[project.entry-points."vllm.general_plugins"] kvcomp = "kvcomp.vllm_plugin:register"``, which
vLLM calls in every process it starts (API server / front-end, engine core, workers)::

    KVCOMP_CONFIG=/path/to/kvcomp-config vllm serve MODEL --attention-backend CUSTOM

Environment variables (read in each process, so spawned workers see them):

``KVCOMP_CONFIG``
    a directory written by ``kvcomp.config.CompressionConfig.save`` (or its ``config.json``).
    Unset or empty: no compression (exact paged attention through the kvcomp backend).
``KVCOMP_VLLM_OVERRIDE_CPU=1``
    also register the backend over ``CPU_ATTN``: vLLM's CPU platform ignores
    ``--attention-backend`` and always picks CPU_ATTN, so this is how CPU runs use kvcomp.
``KVCOMP_VLLM_TRACE=/path/file.jsonl``
    each attention layer appends one JSON line (pid, layer, cache shape, method) the first time
    it runs a real batch: the proof that the backend was used, and a cheap debugging aid.

Importing this package does not import vLLM or torch; :func:`register` imports vLLM.
"""

from __future__ import annotations

import os

ENV_CONFIG = "KVCOMP_CONFIG"
ENV_OVERRIDE_CPU = "KVCOMP_VLLM_OVERRIDE_CPU"
ENV_TRACE = "KVCOMP_VLLM_TRACE"

#: dotted path of the backend class vLLM resolves lazily
BACKEND_PATH = "kvcomp.vllm_plugin.backend.KVCompAttentionBackend"


def register() -> None:
    """Register kvcomp's attention backend with vLLM (the ``vllm.general_plugins`` entry point).

    Always registers it as ``AttentionBackendEnum.CUSTOM``; with ``KVCOMP_VLLM_OVERRIDE_CPU=1``
    also over ``CPU_ATTN``. With ``KVCOMP_CONFIG`` set, a decoder attention layer that vLLM gives
    any other backend raises (``compat.guard_backend_selection``) instead of silently serving
    uncompressed pages. Re-entrant: vLLM may call it several times per process, and each call
    only (re)writes the same override entries.

    Raises:
        ValueError: ``KVCOMP_VLLM_OVERRIDE_CPU`` is set to something other than ``0``/``1``.
    """
    if os.environ.get(ENV_CONFIG, "").strip():
        # first, so that a registration failing below (vLLM only logs plugin errors) still ends
        # in an error when the model is built, not in a stock backend serving uncompressed pages
        from .compat import guard_backend_selection

        guard_backend_selection(BACKEND_PATH, "serve with --attention-backend CUSTOM (GPU) or set "
                                f"{ENV_OVERRIDE_CPU}=1 (vLLM's CPU platform ignores --attention-backend)")
    override = os.environ.get(ENV_OVERRIDE_CPU, "0").strip()
    if override not in ("", "0", "1"):
        raise ValueError(f"{ENV_OVERRIDE_CPU} must be 0 or 1, got {override!r}")
    from .compat import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    if override == "1":
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)


__all__ = ["register", "BACKEND_PATH", "ENV_CONFIG", "ENV_OVERRIDE_CPU", "ENV_TRACE"]
