"""A transformers ``Cache`` that stores the KV cache compressed, with real savings.

Each layer keeps its KV heads in separate storage groups (see :meth:`CompressionConfig.layer_groups`):

* ``full``: retrieval heads, ``K, V [B, n, T, D]`` (grown like ``DynamicLayer``);
* ``streaming``: DuoAttention streaming heads, only the first ``sink`` tokens and the last
  ``recent`` tokens are kept (``[B, n, <=sink+recent, D]``); everything else is freed;
* ``think``: ThinK heads, keys older than the ``window`` stored narrower ``[B, n, T_p, D_keep]``
  with their channel index ``[B, n, D_keep]``; the last ``window`` keys full width; values whole;
* ``vq`` / ``vq_think``: A²ATS heads, int16 codes ``[B, n, T]`` on the model's device; the full KV
  (keys narrow for ``vq_think``) lives in host memory (pinned when CUDA is present); decode
  scores codes through a LUT, selects top-K + sink + local and attends exactly over those.

``update`` only stashes the new tokens; the ``kvcomp`` attention function (:mod:`.attention`)
attends and then commits them, since ThinK needs the prompt's queries to choose channels.
The first chunk (an empty cache) is attended exactly on every head except DuoAttention's
streaming heads, which see only the sink and recent tokens in prefill too (as DuoAttention and
kvcomp's vLLM backend); every later chunk and every decode step runs compressed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import ref
from ..config import CompressionConfig
from ..ops.prefill import dense_prefill, streaming_prefill


@dataclass
class RopeInfo:
    """The model's rotary embedding: ``inv_freq [D/2]`` and ``attention_scaling``."""

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0

    @classmethod
    def from_model(cls, model) -> "RopeInfo":
        for m in model.modules():
            inv = getattr(m, "inv_freq", None)
            if isinstance(inv, torch.Tensor):
                return cls(inv.detach().float().cpu(), float(getattr(m, "attention_scaling", 1.0)))
        raise ValueError("model has no rotary embedding module with `inv_freq`: kvcomp needs a RoPE model")

    def cos_sin(self, pos: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        return ref.rope_cos_sin(pos.to(device), self.inv_freq.to(device), self.attention_scaling)


class HostBuffer:
    """A ``[B, n, T, D]`` tensor in host memory grown along T with spare capacity (pinned if asked)."""

    def __init__(self, like: torch.Tensor, pin: bool):
        self.pin = pin
        self.data = self._alloc(like.shape[0], like.shape[1], 0, like.shape[3], like.dtype)
        self.length = 0

    def _alloc(self, b, n, cap, d, dtype):
        return torch.empty(b, n, cap, d, dtype=dtype, device="cpu", pin_memory=self.pin)

    def append(self, x: torch.Tensor) -> None:
        b, n, t, d = x.shape
        need = self.length + t
        if need > self.data.shape[2]:
            cap = max(need, int(self.data.shape[2] * 1.25) + 64)
            new = self._alloc(b, n, cap, d, x.dtype)
            new[:, :, : self.length] = self.data[:, :, : self.length]
            self.data = new
        self.data[:, :, self.length:need].copy_(x, non_blocking=False)
        self.length = need

    def view(self) -> torch.Tensor:
        return self.data[:, :, : self.length]

    def drop_front(self, t: int) -> torch.Tensor:
        """Remove and return the first ``t`` tokens (used to spill recent keys into narrow storage)."""
        out = self.data[:, :, :t].clone()
        self.data[:, :, : self.length - t] = self.data[:, :, t: self.length].clone()
        self.length -= t
        return out


def _qheads(kv_idx: torch.Tensor, g: int) -> torch.Tensor:
    return (kv_idx[:, None] * g + torch.arange(g)).flatten()


class KVCompLayer(CacheLayerMixin):
    """One decoder layer's compressed KV (all policy groups of that layer)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, config: CompressionConfig, layer_idx: int, rope: RopeInfo, pin_host: bool = False):
        super().__init__()
        self.cfg, self.layer_idx, self.rope, self.pin_host = config, layer_idx, rope, pin_host
        self.groups = {k: torch.tensor(v, dtype=torch.long) for k, v in config.layer_groups(layer_idx).items() if v}
        self.seen = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.state: dict[str, dict[str, object]] = {k: {} for k in self.groups}

    # ------------------------------------------------------------ CacheLayerMixin API
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending is not None:
            raise RuntimeError(
                "KVCompCache: new tokens were cached but never attended; the model must run with "
                "attn_implementation='kvcomp' (use kvcomp.hf.compress(model, config))")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        key_states.kvcomp_layer = self  # the handle the kvcomp attention function looks up
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen, self.pending = 0, None
        self.state = {k: {} for k in self.groups}

    def reorder_cache(self, beam_idx) -> None:
        raise RuntimeError("KVCompCache does not support beam search (reorder_cache): use greedy or sampling")

    # ------------------------------------------------------------ bytes
    def tensors(self):
        """Yield ``(tier, tensor)`` for every tensor this layer holds; tier is 'device' or 'host'."""
        for name, st in self.state.items():
            for key, t in st.items():
                if isinstance(t, HostBuffer):
                    yield "host", t.data
                elif isinstance(t, torch.Tensor):
                    yield ("host" if key.startswith("host_") else "device"), t

    # ------------------------------------------------------------ attention
    def attend(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attend ``q [B,Hq,Tq,D]`` over the cache plus the pending tokens, then commit them."""
        if self.pending is None:
            raise RuntimeError("kvcomp attention called without a KVCompCache update for this layer")
        k, v = self.pending
        self.pending = None
        b, hq, tq, d = q.shape
        hkv = k.shape[1]
        if hq % hkv:
            raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
        if hkv != self.cfg.num_kv_heads or d != self.cfg.head_dim:
            raise ValueError(f"layer {self.layer_idx}: model has {hkv} KV heads of dim {d}, config expects "
                             f"{self.cfg.num_kv_heads} of dim {self.cfg.head_dim}")
        g = hq // hkv
        pos = torch.arange(self.seen, self.seen + tq)
        if self.seen == 0:
            out = self._prefill_attention(q, k, v, scale, g)
            for name, idx in self.groups.items():
                qi = _qheads(idx, g).to(q.device)
                getattr(self, f"_prefill_{name.replace('vq_think', 'vq')}")(
                    name, q[:, qi], k[:, idx.to(k.device)], v[:, idx.to(v.device)], pos)
        else:
            out = torch.empty_like(q)
            for name, idx in self.groups.items():
                qi = _qheads(idx, g).to(q.device)
                o = getattr(self, f"_step_{name.replace('vq_think', 'vq')}")(
                    name, q[:, qi], k[:, idx.to(k.device)], v[:, idx.to(v.device)], pos, scale)
                out[:, qi] = o.to(out.dtype)
        self.seen += tq
        return out

    def _prefill_attention(self, q, k, v, scale, g):
        """Prompt attention: exact for every head except DuoAttention's streaming heads, which see
        only the sink and recent tokens in prefill too (as DuoAttention and the vLLM backend)."""
        st = self.groups.get("streaming")
        if st is None:
            return dense_prefill(q, k, v, scale=scale)
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        others = torch.tensor([h for h in range(k.shape[1]) if h not in set(st.tolist())], dtype=torch.long)
        if others.numel():
            qo, kv = _qheads(others, g).to(q.device), others.to(k.device)
            out[:, qo] = dense_prefill(q[:, qo], k[:, kv], v[:, kv], scale=scale).to(q.dtype)
        qs, ks = _qheads(st, g).to(q.device), st.to(k.device)
        out[:, qs] = streaming_prefill(q[:, qs], k[:, ks], v[:, ks], sink=self.cfg.duo.sink, window=self.cfg.duo.recent,
                                       scale=scale).to(q.dtype)
        return out

    # full -------------------------------------------------------------
    def _prefill_full(self, name, q, k, v, pos):
        self.state[name] = {"k": k.contiguous(), "v": v.contiguous()}

    def _step_full(self, name, q, k, v, pos, scale):
        st = self.state[name]
        st["k"] = torch.cat([st["k"], k], dim=2)
        st["v"] = torch.cat([st["v"], v], dim=2)
        return dense_prefill(q, st["k"], st["v"], scale=scale)

    # streaming ---------------------------------------------------------
    def _keep_streaming(self, name, k, v, kpos):
        sink, recent = self.cfg.duo.sink, self.cfg.duo.recent
        is_sink = kpos < sink
        last = int(kpos.max())
        # the next query (position last+1) sees keys with last+1 - k < recent: keep recent-1 of them
        is_recent = (~is_sink) & (kpos > last + 1 - recent)
        keep = (is_sink | is_recent).nonzero().flatten().to(k.device)
        self.state[name] = {"k": k.index_select(2, keep), "v": v.index_select(2, keep)}

    def _streaming_positions(self, name) -> torch.Tensor:
        """Positions of the stored streaming tokens: the sinks, then the most recent ones."""
        n_sink = min(self.seen, self.cfg.duo.sink)
        n_recent = self.state[name]["k"].shape[2] - n_sink
        return torch.cat([torch.arange(n_sink), torch.arange(self.seen - n_recent, self.seen)])

    def _prefill_streaming(self, name, q, k, v, pos):
        self._keep_streaming(name, k, v, pos)

    def _step_streaming(self, name, q, k, v, pos, scale):
        st = self.state[name]
        kk = torch.cat([st["k"], k], dim=2)
        vv = torch.cat([st["v"], v], dim=2)
        kpos = torch.cat([self._streaming_positions(name), pos])
        o = ref.streaming_attention(q, kk, vv, sink=self.cfg.duo.sink, window=self.cfg.duo.recent, scale=scale,
                                    q_pos=pos.to(q.device), k_pos=kpos.to(q.device))
        self._keep_streaming(name, kk, vv, kpos)
        return o

    # think -------------------------------------------------------------
    def _channels(self, name, q, k):
        t = self.cfg.think
        if t.channels is not None:
            ch = t.channels[self.layer_idx, self.groups[name]].to(k.device)
            return ch.unsqueeze(0).expand(k.shape[0], -1, -1).contiguous()
        w = min(t.window, q.shape[2])
        scores = ref.think_channel_scores(q[:, :, -w:], k)
        return ref.think_keep_channels(scores, t.prune_ratio).clone()  # own storage, not a view of the sort

    def _prefill_think(self, name, q, k, v, pos):
        w = self.cfg.think.window
        chan = self._channels(name, q, k)
        tp = max(k.shape[2] - w, 0)
        self.state[name] = {"k_pruned": ref.pack_pruned_keys(k[:, :, :tp], chan).contiguous(),
                            "chan": chan, "k_recent": k[:, :, tp:].clone(), "v": v.contiguous()}

    def _step_think(self, name, q, k, v, pos, scale):
        st, w = self.state[name], self.cfg.think.window
        recent = torch.cat([st["k_recent"], k], dim=2)
        st["v"] = torch.cat([st["v"], v], dim=2)
        o = ref.pruned_key_attention(q, st["k_pruned"], st["chan"], recent, st["v"], scale=scale)
        spill = recent.shape[2] - w
        if spill > 0:
            st["k_pruned"] = torch.cat([st["k_pruned"], ref.pack_pruned_keys(recent[:, :, :spill], st["chan"])], dim=2)
            recent = recent[:, :, spill:].clone()  # own storage: a view would keep the spilled keys alive
        st["k_recent"] = recent
        return o

    # vq ----------------------------------------------------------------
    def _encode(self, name, k, pos):
        cos, sin = self.rope.cos_sin(pos, k.device)
        k_pre = ref.unapply_rope(k.float(), cos, sin)
        idx = self.groups[name]
        cb = self.cfg.vq.codebook[self.layer_idx, idx].to(k.device)
        wh = self.cfg.vq.whiten[self.layer_idx, idx].to(k.device)
        return ref.vq_encode(k_pre, cb, wh)

    def _prefill_vq(self, name, q, k, v, pos):
        st = {"codes": self._encode(name, k, pos)}
        host_k = k.cpu()
        if name == "vq_think":
            w = self.cfg.think.window
            chan = self._channels(name, q, k)
            tp = max(k.shape[2] - w, 0)
            st["host_chan"] = chan.cpu()
            packed = ref.pack_pruned_keys(host_k[:, :, :tp], st["host_chan"])
            st["host_k_pruned"] = HostBuffer(packed, self.pin_host)
            st["host_k_pruned"].append(packed)
            st["host_k_recent"] = HostBuffer(host_k, self.pin_host)
            st["host_k_recent"].append(host_k[:, :, tp:])
        else:
            st["host_k"] = HostBuffer(host_k, self.pin_host)
            st["host_k"].append(host_k)
        st["host_v"] = HostBuffer(v, self.pin_host)
        st["host_v"].append(v.cpu())
        self.state[name] = st

    def _host_append(self, name, k, v):
        st = self.state[name]
        st["host_v"].append(v.cpu())
        st["host_k_recent" if name == "vq_think" else "host_k"].append(k.cpu())

    def _host_spill(self, name):
        """vq_think: keys older than the ThinK window move to narrow storage (after attending, as ThinK)."""
        if name != "vq_think":
            return
        st = self.state[name]
        spill = st["host_k_recent"].length - self.cfg.think.window
        if spill > 0:
            st["host_k_pruned"].append(ref.pack_pruned_keys(st["host_k_recent"].drop_front(spill), st["host_chan"]))

    def _host_keys_full_width(self, name, idx: torch.Tensor) -> torch.Tensor:
        """Gather keys ``idx [B,n,K]`` (host) of a VQ group as ``[B,n,K,D]``.

        For ``vq_think`` the narrow keys are scattered back into their channels with zeros
        elsewhere, so ``q . k`` equals ThinK's ``q[chan] . k_pruned`` exactly; only the selected
        rows are widened, in a small transient buffer.
        """
        st = self.state[name]
        d = self.cfg.head_dim
        if name != "vq_think":
            kk = st["host_k"].view()
            return torch.gather(kk, 2, idx[..., None].expand(-1, -1, -1, d))
        kp, kr = st["host_k_pruned"].view(), st["host_k_recent"].view()
        tp = kp.shape[2]
        chan = st["host_chan"]
        b, n, kmax = idx.shape
        out = torch.zeros(b, n, kmax, d, dtype=kr.dtype)
        in_p = idx < tp
        if tp:
            sel = torch.gather(kp, 2, idx.clamp(max=tp - 1)[..., None].expand(-1, -1, -1, kp.shape[3]))
            wide = torch.zeros_like(out).scatter_(3, chan[:, :, None, :].expand(-1, -1, kmax, -1), sel)
            out = torch.where(in_p[..., None], wide, out)
        ridx = (idx - tp).clamp(0, max(kr.shape[2] - 1, 0))
        rsel = torch.gather(kr, 2, ridx[..., None].expand(-1, -1, -1, d))
        return torch.where(in_p[..., None], out, rsel)

    def _step_vq(self, name, q, k, v, pos, scale):
        self.state[name]["codes"] = torch.cat([self.state[name]["codes"], self._encode(name, k, pos)], dim=2)
        self._host_append(name, k, v)
        out = self._attend_vq(name, q, k, scale)
        self._host_spill(name)
        return out

    def _attend_vq(self, name, q, k, scale):
        st, vq = self.state[name], self.cfg.vq
        pos = torch.arange(self.seen, self.seen + q.shape[2])
        b, nq, tq, d = q.shape
        n = k.shape[1]
        total = self.seen + tq
        if tq > 1:  # chunked prefill: exact attention over everything (selection is a decode-time method)
            allidx = torch.arange(total).expand(b, n, total).contiguous()
            kk = self._host_keys_full_width(name, allidx).to(q.device)
            return dense_prefill(q, kk.to(q.dtype), st["host_v"].view().to(q.device).to(q.dtype), scale=scale)
        cos, sin = self.rope.cos_sin(pos, q.device)
        q_pre = ref.unapply_rope(q.float(), cos, sin)
        qw = ref.windowed_rope_query(q_pre[:, :, 0], self.rope.inv_freq.to(q.device), vq.rel_pos,
                                     self.rope.attention_scaling)
        cb = vq.codebook[self.layer_idx, self.groups[name]].to(q.device)
        lut = ref.vq_lut(qw, cb, scale=scale)
        scores = ref.vq_scores(lut, st["codes"])
        mask = ref.vq_select(scores, topk=vq.topk_tokens(total), sink=vq.sink, local=vq.local, num_kv_heads=n)
        idx, count = ref.mask_to_indices(mask)
        st["last_selected"] = count.float().mean().item() / total
        hidx = idx.long().cpu()
        k_sel = self._host_keys_full_width(name, hidx).to(q.device, non_blocking=True)
        v_sel = torch.gather(st["host_v"].view(), 2, hidx[..., None].expand(-1, -1, -1, d)).to(q.device, non_blocking=True)
        kmax = hidx.shape[2]
        ar = torch.arange(kmax, device=q.device, dtype=torch.int32).expand(b, n, kmax).contiguous()
        return ref.sparse_attention(q, k_sel, v_sel, ar, count.to(q.device), scale=scale)


class KVCompCache(Cache):
    """A transformers ``Cache`` holding the compressed KV of every layer.

    Use :func:`kvcomp.hf.compress` to build it and switch the model to the ``kvcomp`` attention.
    :meth:`kv_bytes` reports the bytes of the tensors really allocated, per tier.
    """

    def __init__(self, config: CompressionConfig, rope: RopeInfo, pin_host: bool | None = None):
        if pin_host is None:
            pin_host = torch.cuda.is_available()
        self.config = config
        super().__init__(layers=[KVCompLayer(config, l, rope, pin_host) for l in range(config.num_layers)])

    def kv_bytes(self) -> dict[str, int]:
        """Allocated bytes per tier (``device``: on the model's device; ``host``: offloaded)."""
        return tensor_bytes(t for layer in self.layers for t in layer.tensors())

    def kv_bytes_per_token(self) -> dict[str, float]:
        n = self.get_seq_length() * self._batch()
        b = self.kv_bytes()
        return {k: (v / n if n else 0.0) for k, v in b.items()}

    def _batch(self) -> int:
        for layer in self.layers:
            for _, t in layer.tensors():
                return t.shape[0]
        return 1

    def selected_fraction(self) -> float | None:
        """Mean fraction of tokens the VQ heads attended at the last decode step (None if no VQ head)."""
        vals = [st["last_selected"] for layer in self.layers for st in layer.state.values() if "last_selected" in st]
        return sum(vals) / len(vals) if vals else None


def tensor_bytes(tiered) -> dict[str, int]:
    """Sum ``untyped_storage().nbytes()`` of ``(tier, tensor)`` pairs, each storage counted once."""
    seen: set[int] = set()
    out = {"device": 0, "host": 0}
    for tier, t in tiered:
        s = t.untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        out[tier] += s.nbytes()
    return out


def dynamic_cache_bytes(cache) -> dict[str, int]:
    """Allocated bytes of a stock ``DynamicCache`` (the full-cache baseline)."""
    return tensor_bytes(("device", t) for layer in cache.layers for t in (layer.keys, layer.values)
                        if isinstance(t, torch.Tensor))
