"""Shared helpers for the calibration tests: a byte tokenizer and a tiny random Llama."""

import torch


class ByteTokenizer:
    """Tiny deterministic tokenizer for tests: one token per UTF-8 byte (ids 1..256), BOS = 0."""

    bos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        ids = [b + 1 for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_special_tokens else []) + ids


def tiny_llama(seed=0, layers=2):
    """2-layer Llama, 4 q / 2 kv heads, head_dim 16, random weights (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()
