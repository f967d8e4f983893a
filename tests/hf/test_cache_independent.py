"""The transformers path against a full-history simulation written from the method definitions.

``kvcomp.hf.compress`` runs a tiny random Llama with the compressed cache. The simulation runs
the same model with a stock ``DynamicCache`` (every uncompressed key and value kept) and an
attention function that expresses each method as a mask or a channel restriction over that full
history. It calls nothing from ``kvcomp.ref`` or ``kvcomp.ops``: RoPE inversion, ThinK channel
scores, VQ codes, LUT scores, the per-query-head top-K and its GQA union are written out below, so
a shared mistake in the references (a wrong GQA union, a wrong ThinK channel grouping) shows up
here although the layer-level simulation of ``test_cache_layer.py`` would agree with it. The path
runs through each route of ``kvcomp.ops`` in turn: the CPU route (native kernels when built), the
references forced (``KVCOMP_OPS=reference``) and the Triton kernels (interpreter on CPU).

Definitions simulated (per KV head ``h``, query heads ``h*G .. h*G+G-1``, absolute positions):

* streaming (DuoAttention): query ``i`` sees key ``j <= i`` iff ``j < sink`` or ``i - j < recent``,
  in the prompt too;
* ThinK: the prompt's last ``window`` queries score channel ``c`` as
  ``(sum over the group of mean_t q[t, c]^2) * mean_j k[j, c]^2`` over the prompt's keys; the
  ``D - floor(ratio * D)`` best channels, rounded up to a multiple of ``MULT`` (the next-best), are kept. At a decode step with ``n`` cached tokens, keys
  at positions ``< n - window`` contribute only their kept channels to ``q . k``;
* A²ATS (VQ): a key's code is its nearest centroid in ``||(k_pre - c) L||^2`` (``k_pre`` = key with
  RoPE undone at its position, lower code on ties). At decode, query head ``h`` scores token ``t``
  as ``scale * (R(rel_pos) q_pre) . codebook[code_t]``, keeps its ``topk`` best tokens (lower
  position on ties); the KV head attends exactly to the union over its group, plus the first
  ``sink`` and last ``local`` tokens. The prompt itself is attended exactly.
"""

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

from kvcomp.config import CompressionConfig, DuoAttention, ThinK, VQRetrieval
from kvcomp.hf import compress, restore
from kvcomp.testing import assert_close

L, HQ, HKV, D = 2, 8, 2, 16
G = HQ // HKV
SINK, RECENT = 2, 5  # DuoAttention
RATIO, WINDOW, MULT = 0.6, 4, 4  # ThinK: 16 - floor(9.6) = 7 channels, rounded up to 8
NC, TOPK, VQ_SINK, VQ_LOCAL, REL_POS = 16, 3, 1, 4, 7  # A²ATS (local >= ThinK window on vq+think heads)
PROMPT, STEPS, BATCH = 23, 9, 2
SIM = "kvcomp_independent_sim"

# per layer, per KV head: (kind, prune_keys)
CASES = {
    "duo": [[("streaming", False), ("full", False)], [("full", False), ("streaming", False)]],
    "think": [[("full", True), ("full", False)], [("full", True), ("full", True)]],
    "vq": [[("vq", False), ("full", False)], [("vq", False), ("vq", False)]],
    "vq-think": [[("vq", True), ("vq", True)], [("full", True), ("vq", True)]],
    "all": [[("streaming", False), ("vq", True)], [("vq", False), ("full", True)]],
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=HQ * D, intermediate_size=192, num_hidden_layers=L,
                      num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def make_config(model, case):
    grid = CASES[case]
    kind = lambda k: torch.tensor([[h[0] == k for h in row] for row in grid])  # noqa: E731
    prune = torch.tensor([[h[1] for h in row] for row in grid])
    gen = torch.Generator().manual_seed(5)
    kw = {}
    if kind("streaming").any():
        kw["duo"] = DuoAttention(pattern=kind("streaming"), sink=SINK, recent=RECENT)
    if prune.any():
        kw["think"] = ThinK(prune_ratio=RATIO, window=WINDOW, heads=prune, channel_multiple=MULT)
    if kind("vq").any():
        whiten = torch.eye(D) + 0.3 * torch.randn(L, HKV, D, D, generator=gen).tril()
        kw["vq"] = VQRetrieval(codebook=torch.randn(L, HKV, NC, D, generator=gen), whiten=whiten, topk=TOPK,
                               sink=VQ_SINK, local=VQ_LOCAL, rel_pos=REL_POS, heads=kind("vq"))
    return CompressionConfig.for_model(model, **kw), grid


# ---------------------------------------------------------------------------------------------
# the simulation: plain torch, no kvcomp.ref


def rotate_half(x):
    return torch.cat([-x[..., D // 2:], x[..., : D // 2]], dim=-1)


def rope_tables(inv_freq, pos):
    ang = pos.double()[:, None] * inv_freq.double()[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def undo_rope(x, inv_freq, pos):
    cos, sin = rope_tables(inv_freq, pos)
    return x * cos - rotate_half(x) * sin


def nearest_codes(k_pre, codebook, whiten):
    """``[B, T, D]`` keys -> ``[B, T]`` codes of the nearest centroid under ``||(k - c) L||``."""
    diff = (k_pre[:, :, None, :] - codebook[None, None]) @ whiten  # [B, T, C, D]
    dist = diff.pow(2).sum(-1)
    return dist.argmin(-1)  # first minimum: the lower code


class Simulation:
    """Attention over the full uncompressed history of a DynamicCache, one method per KV head."""

    def __init__(self, cfg, grid, inv_freq):
        self.cfg, self.grid, self.inv_freq = cfg, grid, inv_freq
        self.kept = {}  # (layer, kv head) -> [B, D] bool: ThinK's kept channels, chosen at the prompt

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        b, hq, tq, d = query.shape
        t = key.shape[2]
        n = t - tq  # tokens cached before this call
        qpos, kpos = torch.arange(n, t), torch.arange(t)
        out = torch.empty_like(query)
        for h in range(HKV):
            kind, prune = self.grid[layer][h]
            qh = query[:, h * G:(h + 1) * G]  # [B, G, Tq, D]
            kh, vh = key[:, h], value[:, h]  # [B, T, D]
            visible = (kpos[None, :] <= qpos[:, None]).expand(b, G, tq, t).clone()
            if kind == "streaming":
                visible &= (kpos[None, :] < SINK) | (qpos[:, None] - kpos[None, :] < RECENT)
            keys = kh[:, None].expand(b, G, t, d)
            if prune:
                if n == 0:
                    self.kept[layer, h] = self.think_channels(qh, kh)
                else:
                    old = (kpos < n - WINDOW)[None, :, None]
                    narrow = kh * self.kept[layer, h][:, None, :]
                    keys = torch.where(old, narrow, kh)[:, None].expand(b, G, t, d)
            if kind == "vq" and n > 0:
                assert tq == 1, "the simulation covers decode steps after the prompt"
                visible &= self.vq_selection(layer, h, qh[:, :, 0], kh, t)[:, None, None, :]
            logits = (qh @ keys.transpose(-1, -2)) * scaling
            logits = logits.masked_fill(~visible, float("-inf"))
            out[:, h * G:(h + 1) * G] = logits.softmax(-1) @ vh[:, None]
        return out.transpose(1, 2).contiguous(), None

    def think_channels(self, q_prompt, k_prompt):
        obs = q_prompt[:, :, -WINDOW:]  # [B, G, W, D]: the last WINDOW prompt queries of the group
        score = obs.pow(2).mean(2).sum(1) * k_prompt.pow(2).mean(1)  # [B, D]
        keep = 8  # D - floor(RATIO * D) = 7, rounded up to a multiple of MULT
        top = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :keep]
        return torch.zeros(score.shape, dtype=torch.bool).scatter_(1, top, True)

    def vq_selection(self, layer, h, q, k, t):
        """``[B, T]`` bool: the union over the group of each query head's top-K, plus sink and local."""
        vq = self.cfg.vq
        cb, wh = vq.codebook[layer, h], vq.whiten[layer, h]
        codes = nearest_codes(undo_rope(k, self.inv_freq, torch.arange(t)), cb, wh)  # [B, T]
        q_pre = undo_rope(q, self.inv_freq, torch.tensor([t - 1]))  # [B, G, D]
        cos, sin = rope_tables(self.inv_freq, torch.tensor([REL_POS]))
        q_w = q_pre * cos + rotate_half(q_pre) * sin
        lut = (q_w @ cb.T) * D ** -0.5  # [B, G, C]
        sel = torch.zeros(q.shape[0], t, dtype=torch.bool)
        for bi in range(q.shape[0]):
            for j in range(G):  # every query head of the group contributes its own top-K
                score = lut[bi, j, codes[bi]]  # [T]
                order = torch.sort(score, descending=True, stable=True).indices
                sel[bi, order[:TOPK]] = True
        pos = torch.arange(t)
        return sel | (pos < VQ_SINK)[None] | (pos >= t - VQ_LOCAL)[None]


def _no_mask(*args, **kwargs):
    return None


def run_steps(model, ids, cache):
    """Prompt, then one token at a time (teacher-forced): the logits of every call."""
    with torch.inference_mode():
        out = [model(ids[:, :PROMPT], cache=cache, use_cache=True).logits[:, -1]]
        for i in range(PROMPT, PROMPT + STEPS):
            out.append(model(ids[:, i:i + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


def simulate(model, cfg, grid, ids):
    AttentionInterface.register(SIM, Simulation(cfg, grid, model.model.rotary_emb.inv_freq.float().cpu()))
    AttentionMaskInterface.register(SIM, _no_mask)
    prev = model.config._attn_implementation
    model.set_attn_implementation(SIM)
    try:
        return run_steps(model, ids, DynamicCache(config=model.config))
    finally:
        model.set_attn_implementation(prev)


# the HF path's ops: the CPU route (native kernels, or the references without the extension), the
# references forced (so a mistake shared by the references and this file's sibling tests shows),
# and the Triton kernels (interpreter on CPU)
ROUTES = {"cpu": {}, "reference": {"KVCOMP_OPS": "reference"}, "triton": {"TRITON_INTERPRET": "1"}}


# (the Triton route runs the two cases that hold every kind of head: interpreter time)
PARAMS = [pytest.param(c, r, id=f"{c}-{r}") for r in ("cpu", "reference") for c in CASES] + [
    pytest.param(c, "triton", id=f"{c}-triton", marks=pytest.mark.triton_route) for c in ("vq-think", "all")]


@pytest.mark.parametrize("case,route", PARAMS)
def test_transformers_path_matches_independent_simulation(model, case, route, monkeypatch):
    for k, v in ROUTES[route].items():
        monkeypatch.setenv(k, v)
    cfg, grid = make_config(model, case)
    ids = torch.randint(0, 128, (BATCH, PROMPT + STEPS), generator=torch.Generator().manual_seed(3))
    stock = run_steps(model, ids, DynamicCache(config=model.config))
    want = simulate(model, cfg, grid, ids)
    try:
        got = run_steps(model, ids, compress(model, cfg))
    finally:
        restore(model)
    assert_close(f"{case}: kvcomp vs simulation", want, got, 1e-5)
    # not vacuous: the method changes the decode logits relative to full attention
    assert (want[:, 1:] - stock[:, 1:]).abs().max() > 1e-3


def test_simulation_tells_the_gqa_union_from_one_head():
    """The VQ selection differs when only one query head of the group picks (the union matters)."""
    gen = torch.Generator().manual_seed(1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cfg = CompressionConfig(L, HKV, D, num_q_heads=HQ, vq=VQRetrieval(
        codebook=torch.randn(L, HKV, NC, D, generator=gen), whiten=torch.eye(D).expand(L, HKV, D, D).clone(),
        topk=TOPK, sink=VQ_SINK, local=VQ_LOCAL, rel_pos=REL_POS))
    sim = Simulation(cfg, CASES["vq"], inv_freq)
    q, k = torch.randn(1, G, D, generator=gen), torch.randn(1, 40, D, generator=gen)
    union = sim.vq_selection(0, 0, q, k, 40)
    first = sim.vq_selection(0, 0, q[:, :1].expand(1, G, D), k, 40)
    assert union.sum() > first.sum() >= TOPK
