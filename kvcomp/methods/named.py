"""Named methods (``full``, ``duo``, ``think``, ``vq`` and ``+``-joined combinations) for a model.

A method name is ``full`` or any ``+``-joined subset of ``duo``, ``think``, ``vq`` (``all`` is
``duo+think+vq``). Calibrated artifacts are found here:

* DuoAttention pattern: ``--duo-pattern`` (a duo-attention ``full_attention_heads.tsv`` or its
  folder) or the pattern shipped in ``kvcomp/patterns_data/<model>/``;
* VQ codebooks: ``--codebooks``, ``$KVCOMP_CACHE/vq_codebooks/<model>-c<C>.safetensors``, or the
  codebooks shipped in ``kvcomp/patterns_data/<model>/`` when their size is C; otherwise they are
  calibrated on first use (minutes on CPU for SmolLM2) and cached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import defaults as DEF
from ..config import CompressionConfig, DuoAttention, ThinK, VQRetrieval

COMPONENTS = ("duo", "think", "vq")
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the kvcomp package


@dataclass
class MethodOptions:
    """Knobs of the named methods (defaults: the issue's targets)."""

    sparsity: float = DEF.DUO_SPARSITY         # DuoAttention: fraction of streaming KV heads
    sink: int = DEF.DUO_SINK                # DuoAttention streaming sink tokens
    recent: int = DEF.DUO_RECENT             # DuoAttention streaming recent window
    prune_ratio: float = DEF.THINK_PRUNE_RATIO      # ThinK: fraction of key channels pruned
    think_window: int = DEF.THINK_WINDOW        # ThinK: observation window / full-width recent keys
    think_channel_multiple: int = DEF.THINK_CHANNEL_MULTIPLE  # ThinK: kept channels rounded up to a multiple
    think_channels: str = "static"  # vLLM layout: "static" (calibrated once) or "query" (chosen per request)
    duo_threshold: str = "layer"  # vLLM layout: DuoAttention gates thresholded per "layer" or "global" (as published)
    topk: float = DEF.VQ_TOPK             # VQ: per-query-head top-K (fraction or count). A²ATS uses 0.03 on
                                   # Llama-3.1-8B; SmolLM2-135M's diffuse attention needs ~0.1 (README)
    vq_sink: int = DEF.VQ_SINK
    vq_local: int = DEF.VQ_LOCAL
    n_codes: int = DEF.VQ_CODES           # the shipped SmolLM2 codebooks; other sizes are calibrated on first use
    vq_dense_layers: int = DEF.VQ_DENSE_LAYERS      # VQ: the first layers keep exact attention (their attention is not sparse)
    vq_select: str = DEF.VQ_SELECT    # VQ: "codes" (A²ATS) or "oracle" (exact-score top-K: analysis baseline, saves nothing)
    duo_pattern: str | None = None
    codebooks: str | None = None


def parse_method(name: str) -> tuple[str, ...]:
    """``"duo+vq"`` -> ``("duo", "vq")``; ``"full"`` -> ``()``; raises on unknown parts."""
    name = name.strip().lower()
    if name == "full":
        return ()
    if name == "all":
        return COMPONENTS
    parts = tuple(p.strip() for p in name.split("+"))
    bad = [p for p in parts if p not in COMPONENTS]
    if bad or not parts or len(set(parts)) != len(parts):
        raise ValueError(f"method {name!r}: use 'full', 'all' or a '+'-joined subset of {COMPONENTS}")
    return tuple(p for p in COMPONENTS if p in parts)


def model_key(model_name: str) -> str:
    from ..models import _canonical

    return os.path.basename(os.path.normpath(model_name)) if os.path.isdir(model_name) else _canonical(model_name)


def shipped_pattern(model_name: str) -> str | None:
    p = os.path.join(_HERE, "patterns_data", model_key(model_name), "full_attention_heads.tsv")
    return p if os.path.exists(p) else None


def duo_pattern_path(model_name: str, opts: MethodOptions) -> str:
    p = opts.duo_pattern
    if p is not None:
        if os.path.isdir(p):
            p = os.path.join(p, "full_attention_heads.tsv")
        if not os.path.exists(p):
            raise FileNotFoundError(f"duo pattern {p} not found")
        return p
    p = shipped_pattern(model_name)
    if p is None:
        raise FileNotFoundError(f"no DuoAttention pattern ships for {model_name!r}: run `kvcomp calibrate duo "
                                f"--model {model_name}` and pass --duo-pattern")
    return p


def shipped_codebooks(model_name: str, n_codes: int) -> str | None:
    """Codebooks calibrated by the kvcomp developers and shipped in the package, if their size matches."""
    p = os.path.join(_HERE, "patterns_data", model_key(model_name), "vq_codebooks.safetensors")
    if not os.path.exists(p):
        return None
    from safetensors import safe_open

    with safe_open(p, framework="pt") as f:
        c = f.get_slice("codebook").get_shape()[-2]
    return p if c == n_codes else None


def codebook_path(model_name: str, n_codes: int) -> str:
    from ..models import cache_root

    return os.path.join(cache_root(), "vq_codebooks", f"{model_key(model_name)}-c{n_codes}.safetensors")


def ensure_codebooks(model, tokenizer, model_name: str, opts: MethodOptions, *, progress: bool = True) -> str:
    """Path of the VQ codebooks, calibrating and caching them on first use."""
    if opts.codebooks is not None:
        if not os.path.exists(opts.codebooks):
            raise FileNotFoundError(f"codebooks {opts.codebooks} not found")
        return opts.codebooks
    path = codebook_path(model_name, opts.n_codes)
    if os.path.exists(path):
        return path
    shipped = shipped_codebooks(model_name, opts.n_codes)
    if shipped is not None:
        return shipped
    from ..calibrate.data import make_text_samples
    from ..calibrate.vq import calibrate_codebooks, save_codebooks

    print(f"[kvcomp] calibrating VQ codebooks ({opts.n_codes} codes) for {model_name}: first use only -> {path}")
    samples = make_text_samples(tokenizer, 8192, sample_len=2048, uuid_fraction=0.2, seed=0)
    res = calibrate_codebooks(model, samples, n_codes=opts.n_codes, iters=25, rel_pos=2048, seed=0, progress=progress)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.safetensors"
    save_codebooks(tmp, res["codebook"], res["whiten"], rel_pos=2048, model=model_name, tokens=res["tokens"])
    os.replace(tmp, path)
    return path


def check_think_channels(mode: str) -> None:
    """Refuse a ThinK channel mode other than :data:`kvcomp.defaults.THINK_CHANNELS`."""
    if mode not in DEF.THINK_CHANNELS:
        raise ValueError(f"think_channels: {mode!r}, use one of {DEF.THINK_CHANNELS}")


def think_config(model, tokenizer, model_name: str, opts: MethodOptions, mode: str) -> ThinK:
    """The named methods' ThinK: per-request channels (``mode="query"``) or :func:`static_think_channels`."""
    return ThinK(prune_ratio=opts.prune_ratio, window=opts.think_window, channel_multiple=opts.think_channel_multiple,
                 channels=static_think_channels(model, tokenizer, model_name, opts) if mode == "static" else None)


def build_method(name: str, model, tokenizer, model_name: str, opts: MethodOptions | None = None,
                 *, progress: bool = True, think_channels: str = "query") -> CompressionConfig | None:
    """The :class:`CompressionConfig` of a named method (None for ``full``: stock cache).

    ``think_channels``: ThinK's kept key channels chosen per request from the prompt's last queries
    (``"query"``, as published) or the static channels the vLLM backend serves by default (``"static"``,
    :func:`static_think_channels`), so the transformers path can measure what vLLM serves.
    """
    opts = opts or MethodOptions()
    parts = parse_method(name)
    check_think_channels(think_channels)
    if not parts:
        return None
    kw = {}
    if "duo" in parts:
        kw["duo"] = DuoAttention.from_tsv(duo_pattern_path(model_name, opts), sparsity=opts.sparsity,
                                          sink=opts.sink, recent=opts.recent)
    if "think" in parts:
        kw["think"] = think_config(model, tokenizer, model_name, opts, think_channels)
    if "vq" in parts:
        import torch

        c = model.config
        hkv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        heads = torch.ones(c.num_hidden_layers, hkv, dtype=torch.bool)
        heads[: opts.vq_dense_layers] = False
        if "duo" in kw:
            heads &= ~kw["duo"].pattern
        kw["vq"] = VQRetrieval.from_file(ensure_codebooks(model, tokenizer, model_name, opts, progress=progress),
                                         topk=opts.topk, sink=opts.vq_sink, local=opts.vq_local, heads=heads,
                                         select=opts.vq_select)
    return CompressionConfig.for_model(model, **kw)


def static_think_channels(model, tokenizer, model_name: str, opts: MethodOptions):
    """Static ThinK channels ``[L, Hkv, D_keep]`` for ``model``, calibrated and cached on first use."""
    from safetensors.torch import load_file

    from ..models import cache_root

    path = os.path.join(cache_root(), "think_channels",
                        f"{model_key(model_name)}-p{opts.prune_ratio:g}-w{opts.think_window}"
                        f"-m{opts.think_channel_multiple}.safetensors")
    if os.path.exists(path):
        return load_file(path)["channels"].long()
    from ..calibrate.data import make_text_samples
    from ..calibrate.think import calibrate_think_channels

    samples = make_text_samples(tokenizer, 4096, sample_len=1024, uuid_fraction=0.2, seed=1)
    ch = calibrate_think_channels(model, samples, opts.prune_ratio, window=opts.think_window,
                                  multiple=opts.think_channel_multiple)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ThinK(prune_ratio=opts.prune_ratio, window=opts.think_window, channels=ch,
          channel_multiple=opts.think_channel_multiple).save_channels(path + ".tmp")
    os.replace(path + ".tmp", path)
    return ch


def check_duo_threshold(name: str, threshold: str) -> None:
    """Refuse a DuoAttention threshold the vLLM backend cannot serve with method ``name``.

    Raises:
        ValueError: ``threshold`` is neither ``layer`` nor ``global``, or ``global`` with another
            method than DuoAttention alone.
    """
    if threshold not in ("layer", "global"):
        raise ValueError(f"duo_threshold: {threshold!r}, use 'layer' or 'global'")
    if threshold == "global" and parse_method(name) != ("duo",):
        raise ValueError(f"--duo-threshold global is served for DuoAttention alone, not {name!r}: use "
                         "--duo-threshold layer (the same number of streaming heads in every layer) with it")


def check_vllm_vq_select(name: str, select: str) -> None:
    """Refuse the oracle selection (an analysis baseline of ``kvcomp eval``) for vLLM."""
    if "vq" in parse_method(name) and select != "codes":
        raise ValueError(f"--vq-select {select} is an analysis baseline of the HF path (kvcomp eval), "
                         "not served by vLLM: use --vq-select codes")


def build_vllm_method(name: str, model, tokenizer, model_name: str, opts: MethodOptions | None = None
                      ) -> CompressionConfig | None:
    """The :class:`CompressionConfig` of a named method laid out for kvcomp's vLLM backend.

    vLLM pages are uniform per KV-cache group, so: DuoAttention streams the same number of heads
    in every layer (the shipped gates thresholded per layer), ThinK prunes every (retrieval) head
    with static channels (``opts.think_channels == "static"``: calibrated on text, cached) or
    channels chosen per request from its own queries (``"query"``, ThinK as published), A²ATS
    covers every layer (``vq_dense_layers`` is ignored; with DuoAttention, every retrieval head).
    Any combination is served. ``opts.duo_threshold == "global"``: DuoAttention alone with the gates
    thresholded globally, as published (``round(sparsity * L * Hkv)`` streaming heads, different
    counts per layer; the backend gives each layer its own page). None for ``full``.

    Raises:
        ValueError: ``opts.think_channels`` is neither ``static`` nor ``query``; ``opts.duo_threshold``
            is neither ``layer`` nor ``global``, or ``global`` with another method than DuoAttention alone.
    """
    import torch

    from ..patterns import read_pattern_tsv, threshold_pattern, threshold_pattern_per_layer

    opts = opts or MethodOptions()
    parts = parse_method(name)
    if not parts:
        return None
    check_think_channels(opts.think_channels)
    check_duo_threshold(name, opts.duo_threshold)
    check_vllm_vq_select(name, opts.vq_select)
    kw = {}
    if "duo" in parts:
        gates = read_pattern_tsv(duo_pattern_path(model_name, opts))
        pattern = (threshold_pattern(gates, opts.sparsity) if opts.duo_threshold == "global"
                   else threshold_pattern_per_layer(gates, opts.sparsity))
        kw["duo"] = DuoAttention(pattern=pattern, sink=opts.sink, recent=opts.recent)
    if "think" in parts:
        kw["think"] = think_config(model, tokenizer, model_name, opts, opts.think_channels)
    if "vq" in parts:
        c = model.config
        hkv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        heads = torch.ones(c.num_hidden_layers, hkv, dtype=torch.bool)
        if "duo" in kw:
            heads &= ~kw["duo"].pattern
        kw["vq"] = VQRetrieval.from_file(ensure_codebooks(model, tokenizer, model_name, opts), topk=opts.topk,
                                         sink=opts.vq_sink, local=opts.vq_local, heads=heads)
    return CompressionConfig.for_model(model, **kw)
