"""kvcomp's compression methods: one home each, used by the transformers path and the vLLM backend.

* :mod:`.dense`: exact paged attention (compression off; the pages every method builds on);
* :mod:`.duo`: DuoAttention (streaming heads: sink + recent; the one home of ring positions);
* :mod:`.think`: ThinK (narrow key pages + a full-width window);
* :mod:`.a2ats`: A²ATS (VQ codes on the device, K/V on the host, top-K exact attention);
* :mod:`.step`: the per-step metadata both paths build; :mod:`.layout`: what a layer stores and
  which method object runs it;
* :mod:`.named`: the named methods (``full``, ``duo``, ``think``, ``vq``, combinations) of the CLI.

A method object has ``write(store, slots, k, v)`` (new tokens into their pages) and ``attend(store,
q, k, v, step, out)`` (one step's attention, decode rows through :mod:`kvcomp.ops`).
"""

from .named import (
    COMPONENTS,
    MethodOptions,
    build_method,
    build_vllm_method,
    codebook_path,
    duo_pattern_path,
    ensure_codebooks,
    model_key,
    parse_method,
    shipped_codebooks,
    shipped_pattern,
    static_think_channels,
)

__all__ = [
    "COMPONENTS",
    "MethodOptions",
    "build_method",
    "build_vllm_method",
    "codebook_path",
    "duo_pattern_path",
    "ensure_codebooks",
    "model_key",
    "parse_method",
    "shipped_codebooks",
    "shipped_pattern",
    "static_think_channels",
]
