"""Greedy generation with or without compression, measuring allocated KV bytes and time."""

from __future__ import annotations

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
    new = out[0, input_ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    if config is None:
        kv = dynamic_cache_bytes(cache)
        sel = None
    else:
        kv = cache.kv_bytes()
        sel = cache.selected_fraction()
    return GenerationResult(text=text, new_tokens=int(new.numel()), prompt_tokens=int(input_ids.shape[1]),
                            seconds=secs, kv_bytes=kv, cached_tokens=cache.get_seq_length() * input_ids.shape[0],
                            selected_fraction=sel)


def sample_input_ids(tokenizer, sample) -> torch.Tensor:
    """Token ids of a harness sample, tokenized exactly as the harness measured its length."""
    return tokenizer(sample.prompt, add_special_tokens=sample.add_special_tokens, return_tensors="pt").input_ids


def make_generate(model, tokenizer, config: CompressionConfig | None):
    """A harness ``generate(sample) -> (text, stats)`` closure for one method."""

    def _gen(sample):
        r = generate(model, tokenizer, sample_input_ids(tokenizer, sample), config, max_new_tokens=sample.max_new_tokens)
        return r.text, r.stats()

    return _gen
