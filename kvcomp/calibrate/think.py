"""Static ThinK channels: one kept-channel set per (layer, KV head), calibrated on text.

ThinK picks key channels per request from the last ``window`` prompt queries. Servers that store
keys narrower in fixed-size pages (kvcomp's vLLM backend) need the choice before the request, so
this module averages ThinK's channel score (:func:`kvcomp.ref.think_channel_scores`, post-RoPE
queries and keys, each layer with its own RoPE: :func:`kvcomp.arch.layer_rope`) over calibration
samples, each normalised to sum 1, and keeps the top channels. Sliding-window layers are skipped
(kvcomp leaves them uncompressed): their rows are placeholders, channels ``0..D_keep-1``.
"""

from __future__ import annotations

import torch

from ..defaults import THINK_CHANNEL_MULTIPLE
from ..ref import apply_rope, rope_cos_sin, think_channel_scores, think_keep_channels


def calibrate_think_channels(model, samples: list[torch.Tensor], prune_ratio: float, *, window: int = 32,
                             multiple: int = THINK_CHANNEL_MULTIPLE, progress: bool = False) -> torch.Tensor:
    """Kept channels ``[L, Hkv, D_keep]`` int64 (ascending) for ``model`` on ``samples``.

    Args:
        samples: ``[1, t]`` token tensors (each ``t > window``).
        prune_ratio: fraction of key channels removed, as :class:`kvcomp.config.ThinK`.
        window: observation queries per sample (ThinK's 32).
        multiple: the kept count is rounded up to a multiple of it with the next-best channels
            (:func:`kvcomp.ref.think_kept_dim`).
    Raises:
        ValueError: no samples, or a sample not longer than ``window``.
    """
    from ..arch import layer_rope, layer_windows
    from ..models import model_geometry
    from .vq import capture_qk

    if not samples:
        raise ValueError("samples: need at least one calibration sample")
    geo = model_geometry(model)
    glob = [l for l, w in enumerate(layer_windows(model.config)) if w is None]
    ropes = [layer_rope(model.config, l, geo["head_dim"]) for l in glob]
    total = None
    for s in samples:
        t = int(s.shape[1])
        if t <= window:
            raise ValueError(f"samples: a sample of {t} tokens is not longer than window={window}")
        keys, queries = capture_qk(model, [s], progress=progress)  # [L, t, H, D] pre-RoPE
        cs = [rope_cos_sin(torch.arange(t), inv, scaling) for inv, scaling in ropes]
        cos, sin = (torch.stack([c[i] for c in cs])[:, None] for i in (0, 1))  # [L_glob, 1, t, D]
        k = apply_rope(keys[glob].permute(0, 2, 1, 3), cos, sin)  # [L_glob, Hkv, t, D]
        q = apply_rope(queries[glob, -window:].permute(0, 2, 1, 3), cos[:, :, -window:], sin[:, :, -window:])
        sc = think_channel_scores(q, k)  # layers as the batch: [L_glob, Hkv, D]
        sc = sc / sc.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        total = sc if total is None else total + sc
    kept = think_keep_channels(total, prune_ratio, multiple)
    out = torch.arange(kept.shape[-1]).expand(geo["num_layers"], geo["num_kv_heads"], -1).clone()
    out[glob] = kept
    return out
