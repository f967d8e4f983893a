"""One layer of every method, built from the method objects in vLLM's layout, for the trace and capture tests.

A method object (:mod:`kvcomp.methods`) over fixed pages (``[num_blocks, block_size, H, D]``, a permuted
block table), its ring and host pages as the vLLM backend hands them over; a prompt of different length
per request is written and attended eagerly (the prefill path), then :meth:`Layer.decode` is one decode
step exactly as the backend runs it (``method.write`` then ``method.attend``), a function of the step's
``q, k, v`` only, over metadata built once (vLLM builds it once per step, outside the layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomp.config import VQRetrieval
from kvcomp.methods.a2ats import A2ATS
from kvcomp.methods.dense import Dense
from kvcomp.methods.duo import DuoAttention
from kvcomp.methods.step import Step, Store
from kvcomp.methods.think import ThinK

METHODS = ("off", "duo", "think", "vq", "duo+vq")
HKV, G, D, BS = 2, 2, 16, 8
PROMPT = (9, 13)  # tokens per request before the decode step
SINK, RECENT, WINDOW, DK = 2, 4, 3, 9
BLOCK_TABLE = ((3, 0, 5), (1, 4, 2))  # permuted blocks, request b in row b


def make_step(seen: list[int], new: list[int], device) -> Step:
    """Metadata of a step adding ``new[b]`` tokens to request ``b``'s ``seen[b]`` (vLLM's fields)."""
    qsl = [0]
    for n in new:
        qsl.append(qsl[-1] + n)
    lens = [s + n for s, n in zip(seen, new)]
    slots = [BLOCK_TABLE[b][p // BS] * BS + p % BS for b in range(len(new)) for p in range(seen[b], lens[b])]
    md = Step(len(new), qsl[-1], max(new), max(lens), torch.tensor(qsl, dtype=torch.int32, device=device),
              torch.tensor(lens, dtype=torch.int32, device=device),
              torch.tensor(BLOCK_TABLE, dtype=torch.int32, device=device),
              torch.tensor(slots, dtype=torch.long, device=device), qsl, lens)
    # per-step values every layer shares, computed once before the layers (Step caches them): the request
    # split and the token positions (``Step.positions`` uses repeat_interleave without an output size: a host
    # sync on CUDA and a data-dependent shape to torch.compile, so the first layer of a step would not trace)
    md.rows()
    md.positions()
    return md


def _vq(gen: torch.Generator) -> VQRetrieval:
    return VQRetrieval(codebook=torch.randn(1, HKV, 8, D, generator=gen),
                       whiten=torch.eye(D).expand(1, HKV, D, D).clone(), topk=3, sink=1, local=2)


@dataclass
class Layer:
    method: object
    store: Store
    md: Step  # the decode step's metadata

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One decode step (one token per request): ``q [B, Hq, D]``, ``k, v [B, Hkv, D]``."""
        out = torch.empty_like(q)
        self.method.write(self.store, self.md.slot_mapping, k, v, self.md)
        self.method.attend(self.store, q, k, v, self.md, out)
        return out

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer's step mutates (pages, codes, ring, host pages)."""
        return [t for _, t in self.store.tensors()]


def build(method: str, device, *, mirror_device=None, seed: int = 0) -> Layer:
    """The layer of ``method`` on ``device`` after its prompt (fp32; host pages on ``mirror_device``,
    default the CPU, as A²ATS offloads them)."""
    device = torch.device(device)
    mirror_device = torch.device("cpu" if mirror_device is None else mirror_device)
    gen = torch.Generator().manual_seed(seed)
    scale = D ** -0.5
    nb, b = 1 + max(max(r) for r in BLOCK_TABLE), len(BLOCK_TABLE)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    pages = lambda h, d, dev=device, dtype=torch.float32: torch.zeros(nb, BS, h, d, dtype=dtype, device=dev)  # noqa: E731
    if method == "off":
        m, store = Dense(HKV, scale, device), Store(k=pages(HKV, D), v=pages(HKV, D))
    elif method == "duo":
        m = DuoAttention(Dense(1, scale, device), [0], [1], G, SINK, RECENT, scale, device)
        store = Store(k=pages(1, D), v=pages(1, D), ring=torch.zeros(b, 1, SINK + RECENT, 2 * D, device=device),
                      ring_block=torch.arange(b, device=device))
    elif method == "think":
        chan = torch.stack([torch.randperm(D, generator=gen)[:DK].sort().values for _ in range(HKV)])
        m = ThinK(chan.to(device), WINDOW, scale)
        store = Store(k=pages(HKV, DK), v=pages(HKV, D), ring=torch.zeros(b, HKV, WINDOW, D, device=device),
                      ring_block=torch.arange(b, device=device))
    elif method == "vq":
        m = A2ATS(_vq(gen), 0, list(range(HKV)), inv_freq, 1.0, scale, device)
        store = Store(codes=torch.full((nb, BS, HKV), -1, dtype=torch.int16, device=device),
                      mirror=(pages(HKV, D, mirror_device), pages(HKV, D, mirror_device)))
    elif method == "duo+vq":
        m = DuoAttention(A2ATS(_vq(gen), 0, [0], inv_freq, 1.0, scale, device), [0], [1], G, SINK, RECENT, scale,
                         device)
        store = Store(codes=torch.full((nb, BS, 1), -1, dtype=torch.int16, device=device),
                      mirror=(pages(HKV, D, mirror_device), pages(HKV, D, mirror_device)))
    else:
        raise ValueError(f"unknown method {method!r}")
    n = sum(PROMPT)
    q, k, v = (torch.randn(n, h, D, generator=gen).to(device) for h in (HKV * G, HKV, HKV))
    md = make_step([0] * len(PROMPT), list(PROMPT), device)
    m.write(store, md.slot_mapping, k, v, md)
    m.attend(store, q, k, v, md, torch.empty_like(q))
    return Layer(m, store, make_step(list(PROMPT), [1] * len(PROMPT), device))


def decode_inputs(device, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's ``q [B, Hq, D]``, ``k, v [B, Hkv, D]``."""
    gen = torch.Generator().manual_seed(seed)
    b = len(PROMPT)
    return tuple(torch.randn(b, h, D, generator=gen).to(device) for h in (HKV * G, HKV, HKV))
