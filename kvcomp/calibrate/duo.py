"""DuoAttention gate optimisation (retrieval vs streaming heads), after mit-han-lab/duo-attention.

One gate ``alpha[l, h]`` in [0, 1] per layer and KV head, shared by the head's query group. In the
"mixed" forward pass every query head outputs ``alpha * Full + (1 - alpha) * Stream`` where Stream
is sink + recent-window attention with an exact token window (duo-attention trains with 128-token
blocks; a key is visible iff ``k <= q`` and ``(k < sink or q - k < window)``).

Training (algorithms.md §1): a full-attention pass without gradient gives the target final hidden
states (after the final norm); the mixed pass is matched to them at the answer positions::

    loss = mean_{t in answers} mean_d (h_full[t] - h_mix[t])^2 + reg * mean |alpha|

AdamW (lr 0.02, weight decay 0) on the gates only, linear warm-up over the first 20% of steps and
decay over the last 20% (floor 0.1), gates clamped to [0, 1] after each step. The result is written
as duo-attention's ``full_attention_heads.tsv`` + ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import cli_args as T
from ..patterns import threshold_pattern, write_pattern_tsv
from ..ref.streaming import streaming_mask

__all__ = [
    "DUO_ATTN_NAME",
    "DuoResult",
    "add_duo_args",
    "duo_lr_factor",
    "duo_mixed_attention",
    "duo_training_mode",
    "gate_summary",
    "main_duo",
    "register_duo_attention",
    "run_duo",
    "save_duo_pattern",
    "train_gates",
]

DUO_ATTN_NAME = "kvcomp_duo_train"


@dataclass
class _DuoState:
    gates: torch.Tensor  # [L, Hkv], may require grad
    sink: int
    window: int
    masks: dict = field(default_factory=dict)  # (Tq, Tk, device) -> (causal, streaming) bool [Tq, Tk]

    def get_masks(self, tq: int, tk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tq, tk, str(device))
        hit = self.masks.get(key)
        if hit is None:
            kp = torch.arange(tk, device=device)
            qp = tk - tq + torch.arange(tq, device=device)
            causal = kp.unsqueeze(0) <= qp.unsqueeze(1)
            stream = streaming_mask(qp, kp, self.sink, self.window)
            if len(self.masks) > 8:
                self.masks.clear()
            hit = self.masks[key] = (causal, stream)
        return hit


def _repeat_kv(x: torch.Tensor, g: int) -> torch.Tensor:
    if g == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, g, t, d).reshape(b, h * g, t, d)


def duo_mixed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function ``"kvcomp_duo_train"``: per-head gated full/streaming mix.

    Args:
        module: the attention module; needs ``layer_idx`` and ``_kvcomp_duo`` (set by
            ``duo_training_mode``).
        query: ``[B, Hq, Tq, D]`` post-RoPE; key/value: ``[B, Hkv, Tk, D]``. Queries are the last Tq
            positions (bottom-right alignment).
        attention_mask: None, or a 4-D bool (True = visible) / additive float mask ANDed in.
        scaling: softmax scale (default ``1/sqrt(D)``).
    Returns:
        ``(out [B, Tq, Hq, D], None)`` as transformers' ``sdpa_attention_forward``.
    """
    state: _DuoState | None = getattr(module, "_kvcomp_duo", None)
    if state is None:
        raise RuntimeError(f"attention implementation {DUO_ATTN_NAME!r} used outside duo_training_mode()")
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of key heads {hkv}")
    g = hq // hkv
    drop = dropout if module.training else 0.0
    causal, stream = state.get_masks(tq, tk, query.device)
    if attention_mask is None and tq == tk:
        # Same call as transformers' sdpa path (enable_gqa + is_causal), so alpha = 1 is bit-exact.
        full = F.scaled_dot_product_attention(query, key, value, dropout_p=drop, scale=scaling,
                                              is_causal=tq > 1, enable_gqa=g > 1)
    else:
        m = causal
        if attention_mask is not None:
            am = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(attention_mask.dtype).min / 2
            m = m & am[..., -tk:]
        full = F.scaled_dot_product_attention(query, _repeat_kv(key, g), _repeat_kv(value, g), attn_mask=m,
                                              dropout_p=drop, scale=scaling)
    sm = stream
    if attention_mask is not None:
        am = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(attention_mask.dtype).min / 2
        sm = sm & am[..., -tk:]
    strm = F.scaled_dot_product_attention(query, _repeat_kv(key, g), _repeat_kv(value, g), attn_mask=sm,
                                          dropout_p=drop, scale=scaling)
    a = state.gates[module.layer_idx].to(query.dtype).repeat_interleave(g).view(1, hq, 1, 1)
    out = a * full + (1.0 - a) * strm
    return out.transpose(1, 2).contiguous(), None


def register_duo_attention() -> None:
    """Register ``duo_mixed_attention`` as transformers attention ``"kvcomp_duo_train"`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(DUO_ATTN_NAME, duo_mixed_attention)


def _attention_modules(model) -> list:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if not mods:
        raise ValueError("model has no attention modules with layer_idx and k_proj (Llama-like decoder expected)")
    return mods


@contextmanager
def duo_training_mode(model, gates: torch.Tensor, *, sink: int, window: int):
    """Within the block the model runs mixed attention with ``gates [L, Hkv]``.

    Switches ``model`` to attention implementation ``"kvcomp_duo_train"`` and restores the previous
    one (and removes the per-module state) on exit.
    """
    if gates.dim() != 2:
        raise ValueError(f"gates must be [num_layers, num_kv_heads], got shape {tuple(gates.shape)}")
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"sink must be an int >= 0, got {sink!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    mods = _attention_modules(model)
    n_layers = max(m.layer_idx for m in mods) + 1
    hkv = model.config.num_key_value_heads
    if tuple(gates.shape) != (n_layers, hkv):
        raise ValueError(f"gates must be [L={n_layers}, Hkv={hkv}], got {tuple(gates.shape)}")
    register_duo_attention()
    state = _DuoState(gates=gates, sink=sink, window=window)
    prev = model.config._attn_implementation
    for m in mods:
        m._kvcomp_duo = state
    model.set_attn_implementation(DUO_ATTN_NAME)
    try:
        yield state
    finally:
        for m in mods:
            if hasattr(m, "_kvcomp_duo"):
                del m._kvcomp_duo
        model.set_attn_implementation(prev)


def duo_lr_factor(step: int, total: int, warmup: float = 0.2, decay: float = 0.2, floor: float = 0.1) -> float:
    """LR multiplier: linear ramp over the first ``warmup`` fraction, linear decay over the last
    ``decay`` fraction, never below ``floor``."""
    n_w = max(1, int(round(warmup * total)))
    n_d = max(1, int(round(decay * total)))
    if step < n_w:
        f = (step + 1) / n_w
    elif step >= total - n_d:
        f = (total - step) / n_d
    else:
        f = 1.0
    return max(floor, min(1.0, f))


def _final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states after the last norm, ``[B, T, hidden]``."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None) or model
    return base(input_ids=input_ids, use_cache=False).last_hidden_state


@dataclass
class DuoResult:
    """``alphas [L, Hkv]`` fp32 in [0, 1]; per-step ``losses`` (total) and ``distill`` (hidden-state
    term); ``seconds`` of training; ``config`` the training arguments."""

    alphas: torch.Tensor
    losses: list[float]
    distill: list[float]
    seconds: float
    config: dict


def train_gates(
    model,
    samples,
    *,
    steps: int = 100,
    lr: float = 0.02,
    reg: float = 0.05,
    sink: int = 64,
    window: int = 256,
    init: float = 1.0,
    progress: bool = True,
) -> DuoResult:
    """Optimise DuoAttention gates on passkey samples (the model stays frozen and unchanged).

    Args:
        model: a transformers causal LM (Llama-like: attention modules with ``layer_idx``); it is
            used on its current device and dtype.
        samples: list of ``PasskeySample`` (``input_ids [1, T]``, ``answer_mask [1, T]``); step s
            uses ``samples[s % len(samples)]``; each sample's full-attention target is computed once.
        steps: optimiser steps. lr, reg: AdamW learning rate and L1 weight on the gates.
        sink, window: streaming branch (``window`` counts the token itself).
        init: initial gate value.
        progress: show a tqdm bar.
    Returns:
        ``DuoResult`` with ``alphas [L, Hkv]``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not (isinstance(reg, (int, float)) and reg >= 0):
        raise ValueError(f"reg must be >= 0, got {reg!r}")
    if not 0.0 <= init <= 1.0:
        raise ValueError(f"init must be in [0, 1], got {init!r}")
    if not samples:
        raise ValueError("samples must be a non-empty list of PasskeySample")
    for i, s in enumerate(samples):
        if s.input_ids.dim() != 2 or s.input_ids.shape != s.answer_mask.shape or s.answer_mask.dtype != torch.bool:
            raise ValueError(f"samples[{i}]: need input_ids [1, T] and a bool answer_mask of the same shape")
        if not s.answer_mask.any():
            raise ValueError(f"samples[{i}] has no answer positions")
    mods = _attention_modules(model)
    n_layers = max(m.layer_idx for m in mods) + 1
    hkv = model.config.num_key_value_heads
    p0 = next(model.parameters())
    device = p0.device
    gates = torch.full((n_layers, hkv), float(init), device=device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: duo_lr_factor(s, steps))

    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    targets: dict[int, torch.Tensor] = {}
    losses: list[float] = []
    distill: list[float] = []
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    try:
        bar = tqdm(range(steps), desc="duo gates", disable=not progress, dynamic_ncols=True)
        for step in bar:
            i = step % len(samples)
            ids = samples[i].input_ids.to(device)
            ans = samples[i].answer_mask.to(device)
            if i not in targets:
                with torch.no_grad():
                    targets[i] = _final_hidden(model, ids)[ans].float()
            with duo_training_mode(model, gates, sink=sink, window=window):
                h = _final_hidden(model, ids)[ans].float()
            d_loss = (h - targets[i]).pow(2).mean(-1).mean()
            loss = d_loss + reg * gates.abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            losses.append(float(loss.detach()))
            distill.append(float(d_loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", distill=f"{distill[-1]:.4f}", mean_a=f"{float(gates.detach().mean()):.3f}")
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    cfg = {"steps": steps, "lr": lr, "reg": reg, "sink_size": sink, "recent_size": window, "init": init,
           "num_samples": len(samples), "context_lengths": sorted({int(s.input_ids.shape[1]) for s in samples})}
    return DuoResult(gates.detach().float().cpu(), losses, distill, time.perf_counter() - t0, cfg)


def save_duo_pattern(out_dir: str | os.PathLike, alphas: torch.Tensor, config: dict) -> str:
    """Write ``out_dir/full_attention_heads.tsv`` (``alphas [L, Hkv]``) and ``out_dir/config.json``.
    Returns the TSV path."""
    if alphas.dim() != 2:
        raise ValueError(f"alphas must be [num_layers, num_kv_heads], got shape {tuple(alphas.shape)}")
    os.makedirs(out_dir, exist_ok=True)
    tsv = os.path.join(out_dir, "full_attention_heads.tsv")
    write_pattern_tsv(tsv, alphas)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return tsv


def gate_summary(alphas: torch.Tensor) -> dict:
    """Distribution of trained gates: quantiles, counts near 0/1, per-layer means, the 50% split."""
    a = alphas.detach().float().flatten()
    q = torch.quantile(a, torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]))
    stream50 = threshold_pattern(alphas, 0.5)
    return {
        "num_heads": int(a.numel()),
        "mean": float(a.mean()),
        "quantiles(0,.1,.25,.5,.75,.9,1)": [round(float(x), 4) for x in q],
        "below_0.05": int((a < 0.05).sum()),
        "above_0.95": int((a > 0.95).sum()),
        "layer_means": [round(float(x), 3) for x in alphas.float().mean(1)],
        "streaming_heads_per_layer_at_sparsity_0.5": [int(x) for x in stream50.sum(1)],
    }


# ---------------------------------------------------------------------------------------------
# command line (called by `kvcomp calibrate duo`)


def add_duo_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``kvcomp calibrate duo`` options to ``parser``."""
    parser.add_argument("--model", default="smollm2-135m", help="registry name or local HF folder")
    parser.add_argument("--output", default=None,
                        help="output directory (default attn_patterns/<model>/lr=..-reg=..-ctx=..-multi_passkeyN)")
    parser.add_argument("--steps", type=T.positive_int, default=30,
                        help="optimiser steps (duo-attention: 2000 on GPUs; the shipped SmolLM2 pattern: 30, ~15 min on 2 CPU cores)")
    parser.add_argument("--num-samples", type=T.positive_int, default=4, help="distinct passkey samples (cycled)")
    parser.add_argument("--min-len", type=T.positive_int, default=1024, help="shortest sample, tokens")
    parser.add_argument("--max-len", type=T.positive_int, default=1024, help="longest sample, tokens (lengths evenly spaced from --min-len)")
    parser.add_argument("--num-passkeys", type=T.positive_int, default=None, help="default: by length (4 at 1K, 8 at 2K, 10 from 2.5K)")
    parser.add_argument("--passkey-words", type=T.positive_int, default=None, help="default: 8 up to 2K, 16 up to 8K, 32 beyond")
    parser.add_argument("--sink", type=T.nonneg_int, default=64,
                        help="sink tokens of the streaming branch (duo-attention trains with 128 at 1K-32K)")
    parser.add_argument("--recent", type=T.positive_int, default=256, help="recent window of the streaming branch")
    parser.add_argument("--lr", type=T.positive_float, default=0.06,
                        help="AdamW learning rate (duo-attention: 0.02 over 2000 steps; raised for short CPU runs so "
                             "gates can travel from 1 to 0)")
    parser.add_argument("--reg", type=T.nonneg_float, default=0.05, help="L1 weight on the gates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_duo(args: argparse.Namespace) -> DuoResult:
    """Run ``kvcomp calibrate duo``: load the model, build data, train gates, write the pattern."""
    from ..models import load_model
    from .data import make_multi_passkey_samples

    if args.min_len > args.max_len:
        raise ValueError(f"--min-len {args.min_len} > --max-len {args.max_len}")
    if args.sink < 0 or args.recent < 1:
        raise ValueError(f"--sink must be >= 0 and --recent >= 1, got {args.sink}, {args.recent}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, device=device)
    samples = make_multi_passkey_samples(tok, args.num_samples, min_len=args.min_len, max_len=args.max_len,
                                         num_passkeys=args.num_passkeys, passkey_words=args.passkey_words,
                                         seed=args.seed)
    res = train_gates(model, samples, steps=args.steps, lr=args.lr, reg=args.reg, sink=args.sink,
                      window=args.recent, progress=not args.no_progress)
    n_keys = len(samples[0].passkeys)
    name = os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model) else args.model
    out = args.output or os.path.join(
        "attn_patterns", name,
        f"lr={args.lr}-reg={args.reg}-ctx={args.min_len}_{args.max_len}-multi_passkey{n_keys}")
    cfg = dict(res.config)
    cfg.update({"model": args.model, "seed": args.seed, "min_len": args.min_len, "max_len": args.max_len,
                "num_passkeys": n_keys, "passkey_words": len(samples[0].passkeys[0]),
                "device": str(device), "seconds": round(res.seconds, 1),
                "final_loss": res.losses[-1], "final_distill": res.distill[-1],
                "first_distill": res.distill[0],
                "streaming": "exact token window (duo-attention: 128-token blocks)"})
    tsv = save_duo_pattern(out, res.alphas, cfg)
    res.config = cfg
    s = gate_summary(res.alphas)
    print(f"wrote {tsv} ({res.seconds:.0f} s, {res.seconds / args.steps:.2f} s/step)")
    print(json.dumps(s))
    return res


def main_duo(argv: list[str] | None = None) -> int:
    """``python -m kvcomp.calibrate.duo``: same options as ``kvcomp calibrate duo``."""
    p = add_duo_args(argparse.ArgumentParser(prog="kvcomp calibrate duo", description=__doc__.splitlines()[0]))
    run_duo(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_duo())
