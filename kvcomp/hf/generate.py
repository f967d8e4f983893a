"""Greedy generation with or without compression, measuring allocated KV bytes and time."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..config import CompressionConfig
from .attention import compress, restore
from .cache import dynamic_cache_bytes


@dataclass
class GenerationResult:
    text: str
    new_tokens: int
    prompt_tokens: int
    seconds: float
    kv_bytes: dict[str, int]            # allocated bytes per tier, read from the cache tensors
    cached_tokens: int
    selected_fraction: float | None = None  # VQ heads: fraction of tokens attended at the last step
    extra: dict = field(default_factory=dict)

    @property
    def device_bytes_per_token(self) -> float:
        return self.kv_bytes["device"] / max(self.cached_tokens, 1)

    @property
    def host_bytes_per_token(self) -> float:
        return self.kv_bytes["host"] / max(self.cached_tokens, 1)

    def stats(self) -> dict:
        s = {"kv_bytes_per_token": self.device_bytes_per_token, "device_bytes_per_token": self.device_bytes_per_token,
             "host_bytes_per_token": self.host_bytes_per_token, "seconds": self.seconds,
             "new_tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens}
        if self.selected_fraction is not None:
            s["selected_fraction"] = self.selected_fraction
        return s


@torch.inference_mode()
def generate(model, tokenizer, input_ids: torch.Tensor, config: CompressionConfig | None, *,
             max_new_tokens: int = 32) -> GenerationResult:
    """Greedy-decode ``input_ids [1, T]`` with ``config`` (None = stock full cache, sdpa).

    Bytes are read from the cache's tensors after generation (``untyped_storage().nbytes()``).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.to(model.device)
    if config is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = compress(model, config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    try:
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
    finally:
        if config is not None:
            restore(model)
    secs = time.perf_counter() - t0
    texts = [_decode(tokenizer, row[input_ids.shape[1]:]) for row in out]
    new = out[0, input_ids.shape[1]:]
    text = texts[0]
    if config is None:
        kv = dynamic_cache_bytes(cache)
        sel = None
    else:
        kv = cache.kv_bytes()
        sel = cache.selected_fraction()
    return GenerationResult(text=text, new_tokens=int(new.numel()), prompt_tokens=int(input_ids.shape[1]),
                            seconds=secs, kv_bytes=kv, cached_tokens=cache.get_seq_length() * input_ids.shape[0],
                            selected_fraction=sel, extra={"texts": texts})


def _decode(tokenizer, ids: torch.Tensor) -> str:
    """Text of one generated row up to (not including) its first end-of-sequence token."""
    eos = _eos_ids(tokenizer)
    cut = next((i for i, t in enumerate(ids.tolist()) if t in eos), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def _eos_ids(tokenizer) -> set[int]:
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


def sample_input_ids(tokenizer, sample) -> torch.Tensor:
    """Token ids of a harness sample, tokenized exactly as the harness measured its length."""
    return tokenizer(sample.prompt, add_special_tokens=sample.add_special_tokens, return_tensors="pt").input_ids


def make_generate(model, tokenizer, config: CompressionConfig | None, *, batched: bool = False):
    """A harness ``generate(sample) -> (text, stats)`` closure for one method.

    With ``batched`` it takes a list of samples of equal token length (the HF path runs no padded
    batches) and returns one ``(text, stats)`` per sample; the bytes are the batch's per token.
    """

    def _gen(sample):
        r = generate(model, tokenizer, sample_input_ids(tokenizer, sample), config, max_new_tokens=sample.max_new_tokens)
        return r.text, r.stats()

    def _gen_batch(samples):
        ids = torch.cat([sample_input_ids(tokenizer, s) for s in samples])
        r = generate(model, tokenizer, ids, config, max_new_tokens=samples[0].max_new_tokens)
        stats = dict(r.stats(), seconds=r.seconds / len(samples), batch=len(samples))
        return [(t, dict(stats)) for t in r.extra["texts"]]

    if not batched:
        return _gen
    _gen_batch.batched = True
    return _gen_batch


@torch.inference_mode()
def _greedy(model, cache, ids: torch.Tensor, max_new_tokens: int, eos: set[int], fork: bool = False) -> list[int]:
    """Append ``ids [1, T]`` to ``cache`` and greedy-decode; the last token returned is not cached yet.
    With ``fork`` the answer is decoded on a copy of the cache, so ``cache`` ends with ``ids``."""
    out: list[int] = []
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    if fork:
        cache = copy.deepcopy(cache)
    for i in range(max_new_tokens):
        t = int(logits[0, -1].argmax())
        out.append(t)
        if t in eos or i == max_new_tokens - 1:
            break
        nxt = torch.tensor([[t]], device=ids.device)
        logits = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return out


def make_converse(model, tokenizer, config: CompressionConfig | None, history: str = "gold"):
    """A multi-query ``converse(sample) -> [(text, stats)]`` closure for one method.

    All turns of a :class:`kvcomp.eval.multiquery.MultiQuerySample` go through ONE cache: the first
    turn is prefilled (and compressed), each later turn is a multi-token chunk appended to that
    cache. ``history="gold"`` (SCBench's multi-turn protocol): each answer is decoded on a copy of the
    cache and the later turn appends the gold answer (:func:`kvcomp.eval.multiquery.gold_turn`), so
    every method sees the same conversation; ``"model"``: the model's own answer stays in the cache
    and the later turn is led by its last token. Stats per turn: the cache's device / host bytes
    per cached token after the turn, the turn's seconds, tokens appended and generated.
    """
    from ..eval.multiquery import HISTORIES, gold_turn

    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
    eos = _eos_ids(tokenizer)

    def _converse(sample):
        cache = DynamicCache(config=model.config) if config is None else compress(model, config)
        results, pending = [], None
        try:
            for i, text in enumerate(sample.turns):
                if history == "gold" and i:
                    text = gold_turn(sample, i)
                ids = tokenizer(text, add_special_tokens=sample.add_special_tokens and i == 0).input_ids
                if pending is not None and history == "model":
                    ids = [pending] + (ids[1:] if ids and ids[0] == pending else ids)
                t0 = time.perf_counter()
                out = _greedy(model, cache, torch.tensor([ids], device=model.device), sample.max_new_tokens, eos,
                              fork=history == "gold")
                secs = time.perf_counter() - t0
                pending = out[-1]
                kv = dynamic_cache_bytes(cache) if config is None else cache.kv_bytes()
                n = max(cache.get_seq_length(), 1)
                sel = None if config is None else cache.selected_fraction()
                stats = {"kv_bytes_per_token": kv["device"] / n, "device_bytes_per_token": kv["device"] / n,
                         "host_bytes_per_token": kv["host"] / n, "seconds": secs, "new_tokens": len(out),
                         "prompt_tokens": len(ids), "cached_tokens": cache.get_seq_length()}
                if sel is not None:
                    stats["selected_fraction"] = sel
                results.append((_decode(tokenizer, torch.tensor(out)), stats))
        finally:
            if config is not None:
                restore(model)
        return results

    return _converse
