"""Compression methods as config objects, composable per layer and per KV head.

Each KV head ``(l, h)`` gets one :class:`HeadPolicy`:

* ``kind="full"``: a retrieval head keeping its whole KV cache,
* ``kind="streaming"``: DuoAttention streaming head, keeping only ``sink`` + ``recent`` tokens,
* ``kind="vq"``: A²ATS retrieval through VQ codes; full KV offloaded to host memory,
* ``kind="window"``: every head of a sliding-window layer (``windows[l]`` set: Gemma 3 local
  layers, Mistral, Qwen2 past ``max_window_layers``): already bounded, left uncompressed, attended
  with the model's window; the methods apply to the other (global) layers only,

and ``prune_keys`` (ThinK) on ``full`` and ``vq`` heads stores their keys with fewer channels.

Example::

    cfg = CompressionConfig.for_model(model,
        duo=DuoAttention.from_tsv("full_attention_heads.tsv", sparsity=0.5),
        think=ThinK(prune_ratio=0.4))
    cfg.save("my-config")           # config.json + pattern TSV + safetensors
    cfg = CompressionConfig.load("my-config")
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass, field

import torch

from .patterns import read_pattern_tsv, threshold_pattern, write_pattern_tsv

from . import defaults as DEF
from .defaults import SUPPORTED_HEAD_DIMS  # noqa: F401  (re-exported)
from .ref.think import think_kept_dim


class ConfigError(ValueError):
    """An invalid compression config; ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class HeadPolicy:
    kind: str = "full"  # "full" | "streaming" | "vq"
    prune_keys: bool = False


KINDS = ("full", "streaming", "vq", "window")


def _int(name: str, v, lo: int) -> int:
    """``v`` must be an int (not a bool, not a float) and ``>= lo``; returns it as a Python int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ConfigError(name, f"must be an int, got {type(v).__name__} {v!r}")
    if v < lo:
        raise ConfigError(name, f"must be >= {lo}, got {v}")
    return int(v)


def _real(name: str, v, lo: float, hi: float, hi_open: bool = False) -> None:
    """``v`` must be a real number (not a bool or string) in ``[lo, hi]`` (``[lo, hi)`` if ``hi_open``)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ConfigError(name, f"must be a number, got {type(v).__name__} {v!r}")
    if not (lo <= v < hi if hi_open else lo <= v <= hi):
        raise ConfigError(name, f"must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v}")


def _bool_grid(name: str, t, shape: tuple[int, int]) -> torch.Tensor:
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.dtype != torch.bool:
        raise ConfigError(name, f"must be a bool tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ConfigError(name, f"must have shape [num_layers, num_kv_heads] = {list(shape)}, got {list(t.shape)}")
    return t.cpu()


@dataclass
class DuoAttention:
    """DuoAttention: streaming heads keep ``sink`` + ``recent`` tokens only.

    ``pattern`` is a bool ``[L, Hkv]`` grid, True = streaming head. ``alphas`` (optional) are the
    trained gates the pattern was thresholded from. Defaults follow duo-attention's quick start
    (sink 64, recent 256).
    """

    pattern: torch.Tensor
    sink: int = DEF.DUO_SINK
    recent: int = DEF.DUO_RECENT
    alphas: torch.Tensor | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.sink = _int("duo.sink", self.sink, 0)
        self.recent = _int("duo.recent", self.recent, 1)

    @classmethod
    def from_alphas(cls, alphas: torch.Tensor, sparsity: float = DEF.DUO_SPARSITY, **kw) -> "DuoAttention":
        _real("duo.sparsity", sparsity, 0.0, 1.0)
        return cls(pattern=threshold_pattern(alphas, sparsity), alphas=alphas.float(), **kw)

    @classmethod
    def from_tsv(cls, path: str | os.PathLike, sparsity: float = DEF.DUO_SPARSITY, **kw) -> "DuoAttention":
        """Load duo-attention's ``full_attention_heads.tsv`` and threshold it at ``sparsity``."""
        return cls.from_alphas(read_pattern_tsv(path), sparsity, **kw)

    @property
    def streaming_fraction(self) -> float:
        return float(self.pattern.float().mean())


@dataclass
class ThinK:
    """ThinK: query-driven key channel pruning per KV head.

    ``prune_ratio`` = fraction λ of channels removed (floor(λ·D)), the kept count then rounded up to a
    multiple of ``channel_multiple`` with the next-best channels (``kvcomp.ref.think_kept_dim``: λ=0.4
    keeps 80 of 128). The last ``window`` tokens
    keep all channels and the last ``window`` prompt queries score the channels. ``heads``
    ([L, Hkv] bool) restricts pruning (default: every non-streaming head). ``channels``
    ([L, Hkv, D_keep] int) are static kept channels (calibrated offline); None = chosen per
    request from the observation window.
    """

    prune_ratio: float = DEF.THINK_PRUNE_RATIO
    window: int = DEF.THINK_WINDOW
    heads: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    channel_multiple: int = DEF.THINK_CHANNEL_MULTIPLE

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _real("think.prune_ratio", self.prune_ratio, 0.0, 1.0, hi_open=True)
        self.window = _int("think.window", self.window, 1)
        self.channel_multiple = _int("think.channel_multiple", self.channel_multiple, 1)

    def kept_dim(self, head_dim: int) -> int:
        return think_kept_dim(head_dim, float(self.prune_ratio), self.channel_multiple)

    def save_channels(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        if self.channels is None:
            raise ConfigError("think.channels", "no static channels to save (query-driven ThinK)")
        save_file({"channels": self.channels.to(torch.int32).contiguous()}, str(path),
                  metadata={"prune_ratio": repr(self.prune_ratio), "window": str(self.window),
                            "channel_multiple": str(self.channel_multiple)})

    @staticmethod
    def load_channels(path: str | os.PathLike) -> torch.Tensor:
        from safetensors.torch import load_file

        d = load_file(str(path))
        if "channels" not in d:
            raise ConfigError("think.channels", f"{path} has no 'channels' tensor")
        return d["channels"].long()


@dataclass
class VQRetrieval:
    """A²ATS: windowed-RoPE query-aware VQ codes select the top-K tokens at decode.

    ``codebook [L, Hkv, C, D]`` and ``whiten [L, Hkv, D, D]`` (Cholesky factor of the query
    Hessian) come from ``kvcomp calibrate vq``. ``topk`` is a fraction of the context (< 1) or
    a token count (>= 1). ``sink`` first and ``local`` last tokens are always attended exactly.
    ``select = "oracle"`` ranks by exact ``q . k`` (host keys) instead of the codes: an analysis
    baseline that saves nothing, refused by the vLLM backend and with ThinK-pruned keys.
    """

    codebook: torch.Tensor
    whiten: torch.Tensor
    topk: float = DEF.VQ_TOPK
    sink: int = DEF.VQ_SINK
    local: int = DEF.VQ_LOCAL
    rel_pos: int = DEF.VQ_REL_POS
    heads: torch.Tensor | None = None
    select: str = DEF.VQ_SELECT

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("codebook", "whiten"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise ConfigError(f"vq.{name}", f"must be a tensor, got {type(getattr(self, name)).__name__}")
        t = self.topk
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (
                0 < t < 1 or (t >= 1 and float(t).is_integer())):
            raise ConfigError("vq.topk", f"must be a fraction in (0, 1) or a whole token count, got {t!r}")
        self.sink = _int("vq.sink", self.sink, 0)
        self.local = _int("vq.local", self.local, 1)
        self.rel_pos = _int("vq.rel_pos", self.rel_pos, 0)
        if self.select not in DEF.VQ_SELECTS:
            raise ConfigError("vq.select", f"must be one of {DEF.VQ_SELECTS}, got {self.select!r}")

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kw) -> "VQRetrieval":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for k in ("codebook", "whiten"):
                if k not in keys:
                    raise ConfigError(f"vq.{k}", f"{path} has no '{k}' tensor")
            meta = f.metadata() or {}
            codebook, whiten = f.get_tensor("codebook"), f.get_tensor("whiten")
        if "rel_pos" in meta and "rel_pos" not in kw:
            kw["rel_pos"] = int(meta["rel_pos"])
        return cls(codebook=codebook.float(), whiten=whiten.float(), **kw)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        save_file({"codebook": self.codebook.float().contiguous(), "whiten": self.whiten.float().contiguous()},
                  str(path), metadata={"rel_pos": str(self.rel_pos), "n_codes": str(self.n_codes)})

    @property
    def n_codes(self) -> int:
        return int(self.codebook.shape[-2])

    def topk_tokens(self, seq_len: int) -> int:
        from .methods.a2ats import topk_tokens

        return topk_tokens(self.topk, seq_len)


@dataclass
class CompressionConfig:
    """The per-(layer, KV head) policy grid of a model, built from the enabled methods."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_q_heads: int | None = None
    duo: DuoAttention | None = None
    think: ThinK | None = None
    vq: VQRetrieval | None = None
    windows: list | None = None  # per layer: the model's sliding window, None on global layers
    kinds: list = field(init=False, repr=False)
    prune: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(cls, model, **methods) -> "CompressionConfig":
        c = model.config
        hq = c.num_attention_heads
        hkv = getattr(c, "num_key_value_heads", None) or hq
        d = getattr(c, "head_dim", None) or c.hidden_size // hq
        from .arch import layer_windows

        windows = layer_windows(c)
        return cls(num_layers=c.num_hidden_layers, num_kv_heads=hkv, head_dim=d, num_q_heads=hq,
                   windows=windows if any(windows) else None, **methods)

    def validate(self) -> None:
        L, H, D = self.num_layers, self.num_kv_heads, self.head_dim
        for name, v in (("num_layers", L), ("num_kv_heads", H), ("head_dim", D)):
            _int(name, v, 1)
        if self.num_q_heads is not None:
            _int("num_q_heads", self.num_q_heads, 1)
        if D not in SUPPORTED_HEAD_DIMS:
            raise ConfigError("head_dim", f"{D} unsupported: kvcomp's kernels take {list(SUPPORTED_HEAD_DIMS)}")
        if self.num_q_heads is not None and self.num_q_heads % H:
            raise ConfigError("num_q_heads", f"{self.num_q_heads} is not a multiple of num_kv_heads {H}")
        shape = (L, H)
        sliding = self._sliding_layers()
        streaming = torch.zeros(shape, dtype=torch.bool)
        if self.duo is not None:
            d = self.duo
            d.validate()  # again: fields may have changed since construction
            d.pattern = _bool_grid("duo.pattern", d.pattern, shape)
            streaming = d.pattern.clone()
            streaming[sliding] = False
        vq_heads = torch.zeros(shape, dtype=torch.bool)
        if self.vq is not None:
            v = self.vq
            v.validate()
            if v.codebook.dim() != 4 or tuple(v.codebook.shape[:2]) != shape or v.codebook.shape[3] != D:
                raise ConfigError("vq.codebook", f"must be [L, Hkv, C, D] = [{L}, {H}, C, {D}], got {list(v.codebook.shape)}")
            if tuple(v.whiten.shape) != (L, H, D, D):
                raise ConfigError("vq.whiten", f"must be [L, Hkv, D, D] = [{L}, {H}, {D}, {D}], got {list(v.whiten.shape)}")
            if not 1 <= v.n_codes <= DEF.MAX_CODES:
                raise ConfigError("vq.codebook", f"{v.n_codes} codes: must be 1..{DEF.MAX_CODES} (int16 codes)")
            vq_heads = ~streaming if v.heads is None else _bool_grid("vq.heads", v.heads, shape).clone()
            vq_heads[sliding] = False
            if (vq_heads & streaming).any():
                raise ConfigError("vq.heads", "a streaming head cannot also be a VQ head")
        prune = torch.zeros(shape, dtype=torch.bool)
        if self.think is not None:
            t = self.think
            t.validate()
            prune = ~streaming if t.heads is None else _bool_grid("think.heads", t.heads, shape).clone()
            prune[sliding] = False
            if (prune & streaming).any():
                raise ConfigError("think.heads", "streaming heads cannot prune keys")
            if t.channels is not None:
                kd = t.kept_dim(D)
                if tuple(t.channels.shape) != (L, H, kd):
                    raise ConfigError("think.channels", f"must be [L, Hkv, D_keep] = [{L}, {H}, {kd}], got {list(t.channels.shape)}")
                if t.channels.min() < 0 or t.channels.max() >= D:
                    raise ConfigError("think.channels", f"channel indices must lie in [0, {D})")
            if self.vq is not None and (prune & vq_heads).any() and self.vq.local < t.window:
                raise ConfigError("vq.local", f"must be >= think.window ({t.window}) on heads that are both VQ and pruned")
            if self.vq is not None and (prune & vq_heads).any() and self.vq.select != "codes":
                raise ConfigError("vq.select", f"{self.vq.select!r} ranks exact full-width keys: not with ThinK-pruned "
                                  "VQ heads (use select='codes' or leave ThinK out)")
        kinds = [["full"] * H for _ in range(L)]
        for l in range(L):
            for h in range(H):
                if streaming[l, h]:
                    kinds[l][h] = "streaming"
                elif vq_heads[l, h]:
                    kinds[l][h] = "vq"
                elif sliding[l]:
                    kinds[l][h] = "window"
        self.kinds = kinds
        self.prune = prune

    def _sliding_layers(self) -> torch.Tensor:
        """``[L]`` bool: the layers with a sliding window (validates ``windows``)."""
        L = self.num_layers
        if self.windows is None:
            return torch.zeros(L, dtype=torch.bool)
        if len(self.windows) != L:
            raise ConfigError("windows", f"must have one entry per layer ({L}), got {len(self.windows)}")
        self.windows = [None if w is None else _int(f"windows[{l}]", w, 1) for l, w in enumerate(self.windows)]
        sliding = torch.tensor([w is not None for w in self.windows])
        if bool(sliding.all()) and not self.is_identity:
            raise ConfigError("windows", "every layer of the model uses a sliding window (already bounded): "
                                         "there is no global layer for kvcomp to compress; serve it uncompressed")
        return sliding

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: a global layer, where the methods apply)."""
        return None if self.windows is None else self.windows[layer]

    # ------------------------------------------------------------------ queries
    def policy(self, layer: int, head: int) -> HeadPolicy:
        return HeadPolicy(self.kinds[layer][head], bool(self.prune[layer, head]))

    def layer_groups(self, layer: int) -> dict[str, list[int]]:
        """KV head indices of ``layer`` per storage group: full, think, streaming, vq, vq_think, window."""
        g: dict[str, list[int]] = {"full": [], "think": [], "streaming": [], "vq": [], "vq_think": [], "window": []}
        for h in range(self.num_kv_heads):
            kind, pr = self.kinds[layer][h], bool(self.prune[layer, h])
            if kind in ("streaming", "window"):
                key = kind
            elif kind == "vq":
                key = "vq_think" if pr else "vq"
            else:
                key = "think" if pr else "full"
            g[key].append(h)
        return g

    def describe(self) -> str:
        n = self.num_layers * self.num_kv_heads
        parts = []
        for kind in KINDS:
            c = sum(row.count(kind) for row in self.kinds)
            if c or kind != "window":  # sliding-window heads: only on hybrid models
                parts.append(f"{kind} {c}/{n}")
        parts.append(f"pruned-keys {int(self.prune.sum())}/{n}")
        return ", ".join(parts)

    @property
    def is_identity(self) -> bool:
        return self.duo is None and self.think is None and self.vq is None

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` plus the pattern TSV, channel masks and codebooks beside it."""
        os.makedirs(directory, exist_ok=True)
        meta: dict = {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                      "head_dim": self.head_dim, "num_q_heads": self.num_q_heads}
        if self.windows is not None:
            meta["windows"] = self.windows
        if self.duo is not None:
            d = self.duo
            meta["duo"] = {"sink": d.sink, "recent": d.recent, "pattern_file": "streaming_pattern.tsv"}
            write_pattern_tsv(os.path.join(directory, "streaming_pattern.tsv"), d.pattern.float())
            if d.alphas is not None:
                write_pattern_tsv(os.path.join(directory, "full_attention_heads.tsv"), d.alphas)
        if self.think is not None:
            t = self.think
            meta["think"] = {"prune_ratio": t.prune_ratio, "window": t.window, "channel_multiple": t.channel_multiple,
                             "heads": None if t.heads is None else t.heads.int().tolist()}
            if t.channels is not None:
                t.save_channels(os.path.join(directory, "think_channels.safetensors"))
                meta["think"]["channels_file"] = "think_channels.safetensors"
        if self.vq is not None:
            v = self.vq
            v.save(os.path.join(directory, "vq_codebooks.safetensors"))
            meta["vq"] = {"topk": v.topk, "sink": v.sink, "local": v.local, "rel_pos": v.rel_pos,
                          "codebook_file": "vq_codebooks.safetensors", "select": v.select,
                          "heads": None if v.heads is None else v.heads.int().tolist()}
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CompressionConfig":
        path = os.path.join(directory, "config.json")
        if not os.path.exists(path):
            raise ConfigError("config.json", f"not found in {directory}")
        with open(path) as f:
            meta = json.load(f)
        kw = {k: meta[k] for k in ("num_layers", "num_kv_heads", "head_dim", "num_q_heads")}
        kw["windows"] = meta.get("windows")
        if "duo" in meta:
            d = meta["duo"]
            pat = read_pattern_tsv(os.path.join(directory, d["pattern_file"])) > 0.5
            alpha_path = os.path.join(directory, "full_attention_heads.tsv")
            alphas = read_pattern_tsv(alpha_path) if os.path.exists(alpha_path) else None
            kw["duo"] = DuoAttention(pattern=pat, sink=d["sink"], recent=d["recent"], alphas=alphas)
        if "think" in meta:
            t = meta["think"]
            ch = ThinK.load_channels(os.path.join(directory, t["channels_file"])) if t.get("channels_file") else None
            heads = None if t.get("heads") is None else torch.tensor(t["heads"], dtype=torch.bool)
            kw["think"] = ThinK(prune_ratio=t["prune_ratio"], window=t["window"], heads=heads, channels=ch,
                                channel_multiple=t.get("channel_multiple", 1))  # saved before rounding: 1
        if "vq" in meta:
            v = meta["vq"]
            heads = None if v.get("heads") is None else torch.tensor(v["heads"], dtype=torch.bool)
            kw["vq"] = VQRetrieval.from_file(os.path.join(directory, v["codebook_file"]), topk=v["topk"],
                                             sink=v["sink"], local=v["local"], rel_pos=v["rel_pos"], heads=heads,
                                             select=v.get("select", DEF.VQ_SELECT))
        return cls(**kw)

    def to_dict(self) -> dict:
        """A JSON-friendly summary (no tensors)."""
        out = {"policy": self.describe()}
        for name in ("duo", "think", "vq"):
            m = getattr(self, name)
            if m is not None:
                out[name] = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
                             if not isinstance(getattr(m, f.name), torch.Tensor)}
        return out
