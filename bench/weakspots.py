"""Where ThinK, A²ATS and their combination lose accuracy: per-layer error of one decode step's attention.

One full-cache pass per prompt (the prompts ``kvcomp eval --seed`` builds) records, per layer, the
post-RoPE keys / values, the prompt's last queries (ThinK's observation window) and the queries of
the first greedy decode steps. Each variant is then applied offline to those tensors with the
``kvcomp.ref`` functions the methods are checked against, and compared with exact attention:
``||o - o_exact|| / ||o_exact||`` per query head, averaged per KV head. Errors are reported for
the heads the default ``all`` gives each method: retrieval heads of layers >= ``vq_dense_layers``
(A²ATS, with or without ThinK keys) and of the first layers (ThinK only); DuoAttention's streaming
heads are left out. No compounding across layers: this isolates each layer's own loss.

Variants (the defaults: top-K 0.1, sink 8, local 64, λ = 0.4 or ``--prune-ratio``, window 32):

* ``vq``: A²ATS (windowed-RoPE LUT top-K over the shipped codes); ``oracle``: exact-score top-K;
* ``think_w{32,64,128}``: ThinK with that observation window / full-width tail;
* ``think_pairs``: ThinK keeping whole RoPE pairs ``(c, c + D/2)`` (pair score = sum of both);
* ``think_mean``: pruned channels read as the prompt keys' channel mean instead of zero;
* ``think_sink8``: the first 8 tokens also keep full-width keys;
* ``vq+X`` / ``oracle+X``: A²ATS's (or the oracle's) selection over ThinK variant X's keys.

    OMP_NUM_THREADS=1 python bench/weakspots.py --context-len 4096 --prompts 2 --out /tmp/ws.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch

STEPS = 4  # decode steps recorded per prompt
TASKS = ("niah_single", "niah_multikey", "niah_multivalue")


def record(model, ids: torch.Tensor, steps: int) -> dict:
    """Greedy-decode ``steps`` tokens after ``ids [1, T]``; per layer ``k, v [Hkv, T+steps, D]``,
    ``qobs [Hq, 128, D]`` (the prompt's last queries) and ``qdec`` (one ``[Hq, D]`` per step)."""
    from transformers import AttentionInterface, DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec: dict = {}

    def capture(module, query, key, value, attention_mask, **kw):
        r = rec.setdefault(module.layer_idx, {"qdec": []})
        if query.shape[2] > 1:
            r["qobs"] = query[0, :, -128:].float().clone()
        else:
            r["qdec"].append(query[0, :, 0].float().clone())
            r["k"], r["v"] = key[0].float().clone(), value[0].float().clone()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("kvcomp_capture", capture)
    prev = model.config._attn_implementation
    model.set_attn_implementation("kvcomp_capture")
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            t = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1].argmax()
            for _ in range(steps):
                t = model(input_ids=t.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1].argmax()
    finally:
        model.set_attn_implementation(prev)
    return rec


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """``q [Hq, D]`` over ``k, v [Hkv, T, D]`` (GQA), ``mask [Hkv, T]``; returns ``(o, logits)``."""
    g = q.shape[0] // k.shape[0]
    lg = torch.einsum("hd,htd->ht", q, k.repeat_interleave(g, 0)) * scale
    if mask is not None:
        lg = lg.masked_fill(~mask.repeat_interleave(g, 0), float("-inf"))
    return torch.einsum("ht,htd->hd", lg.softmax(-1), v.repeat_interleave(g, 0)), lg


def keep_pairs(scores: torch.Tensor, prune_ratio: float) -> torch.Tensor:
    """ThinK's kept channels as whole RoPE pairs ``(c, c + D/2)``, ``ceil(D_keep / 2)`` pairs."""
    d = scores.shape[-1]
    h = d // 2
    n = -(-(d - math.floor(prune_ratio * d)) // 2)
    top = torch.sort(scores[..., :h] + scores[..., h:], dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.cat([top, top + h], -1).sort(-1).values


def pruned_keys(k: torch.Tensor, chans: torch.Tensor, pos: int, window: int, fill: torch.Tensor | None = None,
                sink: int = 0) -> torch.Tensor:
    """``k [Hkv, T, D]`` as ThinK stores it for a query at ``pos``: keys before ``pos - window`` (and
    from ``sink`` on) keep ``chans [Hkv, D_keep]``; the others channels read 0 (or ``fill [Hkv, D]``)."""
    keep = torch.zeros(k.shape[0], 1, k.shape[2], dtype=torch.bool).scatter_(2, chans[:, None, :], True)
    t = torch.arange(k.shape[1])
    old = ((t < pos - window) & (t >= sink))[None, :, None]
    f = torch.zeros_like(k) if fill is None else fill[:, None, :].expand_as(k)
    return torch.where(old & ~keep, f, k)


def layer_errors(r: dict, t0: int, inv_freq: torch.Tensor, vq, layer: int, prune_ratio: float) -> list[dict]:
    """Every variant's relative error per KV head, for each recorded decode step of one layer."""
    from kvcomp import ref

    k_all, v_all = r["k"], r["v"]
    hkv, _, d = k_all.shape
    scale = d ** -0.5
    cos, sin = ref.rope_cos_sin(torch.arange(k_all.shape[1]), inv_freq)
    book, whiten = vq.codebook[layer].float(), vq.whiten[layer].float()
    codes = ref.vq_encode(ref.unapply_rope(k_all, cos, sin)[None], book, whiten)[0]
    chans = {}
    for w in (32, 64, 128):
        sc = ref.think_channel_scores(r["qobs"][None, :, -w:], k_all[None, :, :t0])
        chans[f"think_w{w}"] = (ref.think_keep_channels(sc, prune_ratio)[0], w, {})
        if w == 32:
            mean = k_all[:, :t0].mean(1)
            chans["think_pairs"] = (keep_pairs(sc, prune_ratio)[0], w, {})
            chans["think_mean"] = (chans["think_w32"][0], w, {"fill": mean})
            chans["think_sink8"] = (chans["think_w32"][0], w, {"sink": 8})
    rows = []
    for step, q in enumerate(r["qdec"]):
        p = t0 + step
        k, v = k_all[:, : p + 1], v_all[:, : p + 1]
        o_ex, lg = attend(q, k, v, None, scale)
        qc, qs = ref.rope_cos_sin(torch.tensor([p]), inv_freq)
        qw = ref.windowed_rope_query(ref.unapply_rope(q[None], qc, qs), inv_freq, vq.rel_pos)
        lut_scores = ref.vq_scores(ref.vq_lut(qw, book, scale=scale), codes[None, :, : p + 1])

        def select(scores):
            return ref.vq_select(scores, topk=vq.topk_tokens(p + 1), sink=vq.sink, local=vq.local,
                                 num_kv_heads=hkv)[0]

        masks = {"vq": select(lut_scores), "oracle": select(lg[None])}

        def err(o):
            return ((o - o_ex).norm(dim=-1) / o_ex.norm(dim=-1)).view(hkv, -1).mean(-1).tolist()

        row = {"step": step}
        for name, m in masks.items():
            row[name] = err(attend(q, k, v, m, scale)[0])
        for name, (ch, w, kw) in chans.items():
            kp = pruned_keys(k, ch, p, w, **kw)
            row[name] = err(attend(q, kp, v, None, scale)[0])
            for sel, m in masks.items():
                row[f"{sel}+{name}"] = err(attend(q, kp, v, m, scale)[0])
        rows.append(row)
    return rows


def main(argv=None) -> int:
    from kvcomp.eval.runner import build_samples
    from kvcomp.hf.cache import RopeInfo
    from kvcomp.hf.generate import sample_input_ids
    from kvcomp.methods import MethodOptions, build_method
    from kvcomp.models import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context-len", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=2, help="prompts: trial 0 of each task, then trial 1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prune-ratio", type=float, default=MethodOptions.prune_ratio, help="ThinK's λ")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    model, tok = load_model(a.model)
    opts = MethodOptions(prune_ratio=a.prune_ratio)
    cfg = build_method("all", model, tok, a.model, opts, progress=False)
    trials = -(-a.prompts // len(TASKS))
    samples = build_samples(tok, tasks=TASKS, context_lens=[a.context_len], n_trials=trials, haystacks=["prose"],
                            seed=a.seed, chat=True)
    samples = sorted(samples, key=lambda s: samples.index(s) % trials)[: a.prompts]
    ropes = RopeInfo.per_layer(model)
    rows = []
    for i, s in enumerate(samples):
        ids = sample_input_ids(tok, s)
        rec = record(model, ids, STEPS)
        for layer in sorted(rec):
            for r in layer_errors(rec[layer], ids.shape[1], ropes[layer].inv_freq, cfg.vq, layer, opts.prune_ratio):
                rows.append({"prompt": i, "task": s.task, "layer": layer, **r})
        print(f"[weakspots] prompt {i} ({s.task}) done", flush=True)
    streaming = cfg.duo.pattern
    summary = {}
    for name in [n for n in rows[0] if n not in ("prompt", "task", "layer", "step")]:
        groups = {"retrieval, layers >= %d" % opts.vq_dense_layers: [], "retrieval, first layers": []}
        for r in rows:
            key = "retrieval, first layers" if r["layer"] < opts.vq_dense_layers else f"retrieval, layers >= {opts.vq_dense_layers}"
            groups[key] += [e for h, e in enumerate(r[name]) if not streaming[r["layer"], h]]
        summary[name] = {g: sum(v) / len(v) for g, v in groups.items()}
        print(f"{name:24s} " + "  ".join(f"{g}: {m:.4f}" for g, m in summary[name].items()), flush=True)
    with open(a.out, "w") as f:
        json.dump({"model": a.model, "context_len": a.context_len, "seed": a.seed, "prompts": a.prompts,
                   "prune_ratio": a.prune_ratio,
                   "steps": STEPS, "summary": summary, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
