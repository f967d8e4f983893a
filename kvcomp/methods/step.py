"""One step's metadata and storage views, in the one form both paths build: the vLLM metadata builder (once per step,
shared by every layer) and the transformers cache (one block per sequence).

A step is a batch of requests, each with ``query_start_loc[b+1] - query_start_loc[b]`` new tokens
(rows of the packed ``[num_actual_tokens, H, D]`` tensors) ending at position ``seq_lens[b] - 1``;
``block_table [num_reqs, max_blocks]`` addresses each request's pages. :meth:`Step.rows` splits the
requests once into one-token rows (decode: kvcomp's decode ops) and multi-token rows (prefill and
chunked prefill).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rows:
    """A sub-batch of requests: their packed query rows and per-request metadata."""

    reqs: list[int]  # request indices in the batch
    req_index: torch.Tensor  # the same on the device (to select per-request rows, e.g. ring blocks)
    rows: torch.Tensor  # [n] query rows (long, on the device)
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor  # [len(reqs) + 1] (int32, on the device)
    span: tuple[int, int] | None = None  # (first, end) when ``rows`` is that contiguous range
    _memo: dict = field(default_factory=dict, repr=False)
    whole: bool = False  # ``span`` is every packed row of the step: ``(0, num_actual_tokens)``

    def memo(self, key, anchor: torch.Tensor, fn):
        """``fn()``, computed once per step for ``key`` and the tensor ``anchor`` it derives from (e.g.
        the rings' block ids): the step's layers share it instead of rebuilding index tensors."""
        hit = self._memo.get(key)
        if hit is None or hit[0] is not anchor:
            hit = self._memo[key] = (anchor, fn())
        return hit[1]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s rows of this sub-batch: a view when they are a contiguous range (vLLM puts the
        decodes first), ``x`` itself when they are all its rows (a decode-only step), else an indexed copy."""
        span = self.span
        if span is None:
            return x[self.rows]
        return x if self.whole and x.shape[0] == span[1] else x[span[0]:span[1]]

    def put(self, out: torch.Tensor, o: torch.Tensor) -> None:
        """``out[rows] = o`` (cast to ``out``'s dtype)."""
        span = self.span
        if span is not None:
            (out if self.whole and out.shape[0] == span[1] else out[span[0]:span[1]]).copy_(o)
        else:
            out[self.rows] = o.to(out.dtype)


def concat_ranges(starts, lens) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lens)])`` (int64, CPU) without a loop: the
    packed row / position / destination indices of several requests' varlen rows."""
    starts, lens = torch.as_tensor(starts, dtype=torch.long), torch.as_tensor(lens, dtype=torch.long)
    return torch.arange(int(lens.sum())) + torch.repeat_interleave(starts - (lens.cumsum(0) - lens), lens)


def split_rows(num_reqs: int, qsl: list[int], block_table: torch.Tensor, seq_lens: torch.Tensor,
               device: torch.device) -> tuple[Rows | None, Rows | None]:
    """``(one-token rows, multi-token rows)`` of a batch; ``None`` for an empty part.

    ``qsl`` is the host copy of ``query_start_loc``. Requests without query rows are dropped.
    """
    single = [b for b in range(num_reqs) if qsl[b + 1] - qsl[b] == 1]
    multi = [b for b in range(num_reqs) if qsl[b + 1] - qsl[b] > 1]

    def part(reqs: list[int]) -> Rows | None:
        if not reqs:
            return None
        lens = [qsl[b + 1] - qsl[b] for b in reqs]
        if len(reqs) == num_reqs and qsl[0] == 0 and qsl[num_reqs] == num_reqs:  # decode-only step: two aranges
            idx = rows = torch.arange(num_reqs, device=device)  # request b is row b
            starts = torch.arange(num_reqs + 1, dtype=torch.int32, device=device)
        else:
            rows = torch.cat([torch.arange(qsl[b], qsl[b + 1]) for b in reqs]).to(device)
            starts = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
            idx = torch.tensor(reqs, device=device)
        first, end = qsl[reqs[0]], qsl[reqs[-1] + 1]
        span = (first, end) if end - first == sum(lens) else None  # ascending reqs: no gap means contiguous
        whole = span == (0, qsl[num_reqs])
        if reqs == list(range(num_reqs)):  # every request: the step's own tensors, no copies
            return Rows(reqs, idx, rows, block_table, seq_lens, starts, span, whole=whole)
        return Rows(reqs, idx, rows, block_table.index_select(0, idx), seq_lens.index_select(0, idx), starts, span,
                    whole=whole)

    return part(single), part(multi)


@dataclass
class Step:
    """Per-step metadata (vLLM: shared by all layers of a KV-cache group).

    Shapes: ``query_start_loc [num_reqs+1]``, ``seq_lens [num_reqs]``, ``block_table
    [num_reqs, max_blocks]`` (int32), ``slot_mapping [num_actual_tokens]`` (int64).
    """

    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_host: list[int] | None = None  # host copy (vLLM keeps one), else read on demand
    # computed once per step, then shared by every layer
    _seq_lens_host: list[int] | None = field(default=None, repr=False)
    _rows: tuple | None = field(default=None, repr=False)
    _positions: torch.Tensor | None = field(default=None, repr=False)
    _padded: bool | None = field(default=None, repr=False)

    def qsl_host(self) -> list[int]:
        """Host copy of ``query_start_loc`` (vLLM's CPU tensor when the builder had it: no sync)."""
        if self.query_start_loc_host is None:
            self.query_start_loc_host = self.query_start_loc.tolist()
        return self.query_start_loc_host

    def seq_lens_host(self) -> list[int]:
        """Host copy of ``seq_lens`` (one device sync per step, for the multi-token rows)."""
        if self._seq_lens_host is None:
            self._seq_lens_host = self.seq_lens.tolist()
        return self._seq_lens_host

    def has_padded_slots(self) -> bool:
        """Whether a token of the step has a negative slot (not stored): one host read per step."""
        if self._padded is None:
            self._padded = bool((self.slot_mapping < 0).any())
        return self._padded

    def rows(self) -> tuple[Rows | None, Rows | None]:
        """``(one-token rows, multi-token rows)``: :func:`split_rows`, once per step."""
        if self._rows is None:
            self._rows = split_rows(self.num_reqs, self.qsl_host(), self.block_table, self.seq_lens,
                                    self.query_start_loc.device)
        return self._rows

    def positions(self) -> torch.Tensor:
        """Absolute position of every packed query row ``[num_actual_tokens]`` (int64), once per step."""
        if self._positions is None:
            qsl = self.query_start_loc.long()
            qlens = qsl[1:] - qsl[:-1]
            req = torch.repeat_interleave(torch.arange(self.num_reqs, device=qsl.device), qlens,
                                          output_size=self.num_actual_tokens)  # no host sync
            start = self.seq_lens.long() - qlens
            self._positions = start[req] + torch.arange(self.num_actual_tokens, device=qsl.device) - qsl[req]
        return self._positions

    def token_requests(self) -> torch.Tensor:
        """Request index of every packed query row ``[num_actual_tokens]`` (int64)."""
        qsl = self.query_start_loc.long()
        return torch.repeat_interleave(torch.arange(self.num_reqs, device=qsl.device), qsl[1:] - qsl[:-1],
                                       output_size=self.num_actual_tokens)

    def all_multi(self) -> "Step":
        """The same step with every request on the multi-token path (the per-request reference route)."""
        n = self.num_reqs
        rows = Rows(list(range(n)), torch.arange(n), torch.arange(self.num_actual_tokens), self.block_table,
                    self.seq_lens, self.query_start_loc)
        return Step(self.num_reqs, self.num_actual_tokens, self.max_query_len, self.max_seq_len,
                    self.query_start_loc, self.seq_lens, self.block_table, self.slot_mapping,
                    self.query_start_loc_host, self._seq_lens_host, (None, rows), self._positions)

    @classmethod
    def uniform(cls, batch: int, seen: int, new: int, capacity: int, device) -> "Step":
        """``batch`` requests of ``seen`` cached + ``new`` tokens, request ``b`` in block ``b`` of
        ``capacity`` slots (the transformers cache's one-block-per-sequence layout)."""
        qsl = [b * new for b in range(batch + 1)]
        total = seen + new
        slots = (torch.arange(batch)[:, None] * capacity + torch.arange(seen, total)[None, :]).flatten()
        return cls(batch, batch * new, new, total, torch.tensor(qsl, dtype=torch.int32, device=device),
                   torch.full((batch,), total, dtype=torch.int32, device=device),
                   torch.arange(batch, dtype=torch.int32, device=device)[:, None], slots.to(device), qsl,
                   [total] * batch)


@dataclass
class Store:
    """A layer's storage for one step: page views, the per-request ring, the host pages.

    ``k, v [blocks, block_size, H, Dk | Dv]`` (exact or pruned keys), or ``codes [blocks,
    block_size, H]`` int16 (A²ATS); ``ring [blocks, H_ring, capacity, C]`` with ``ring_block
    [num_reqs]``; ``mirror = (k, v)`` host pages ``[blocks, block_size, H_host, D]``.
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    ring: torch.Tensor | None = None
    ring_block: torch.Tensor | None = None
    mirror: tuple[torch.Tensor, torch.Tensor] | None = None
    chan: torch.Tensor | None = None  # ThinK's per-request kept channels [num_reqs, H, D_keep] (query-driven)
    host_ring: bool = False  # the ring (and chan) live in host memory beside the host pages

    def tensors(self):
        """``(tier, tensor)`` of every tensor held (tier ``device`` or ``host``); block ids excluded."""
        for name in ("k", "v", "codes", "ring", "chan"):
            t = getattr(self, name)
            if t is not None:
                yield ("host" if self.host_ring and name in ("ring", "chan") else "device"), t
        for t in self.mirror or ():
            yield "host", t


def grow(t: torch.Tensor | None, shape: tuple[int, ...], dim: int, *, dtype, device, pin: bool = False) -> torch.Tensor:
    """``t`` reallocated to exactly ``shape`` (larger along ``dim``), its content kept at the front:
    the transformers cache's one-block-per-request pages grow to the tokens they hold, no slack."""
    if t is not None and tuple(t.shape) == tuple(shape):
        return t
    new = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
    if t is not None:
        new.narrow(dim, 0, t.shape[dim]).copy_(t)
    return new
