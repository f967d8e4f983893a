"""fp8 K/V pages and rings for a method object: the step's blocks dequantised on read, written blocks requantised.

vLLM's ``--kv-cache-dtype fp8`` gives a layer ``uint8`` pages and one key and one value scale
(:mod:`kvcomp.ref.fp8`); kvcomp's per-request ring (:mod:`kvcomp.vllm_plugin.ring`: DuoAttention's
streaming heads, ThinK's full-width window) takes the page dtype, so it is e4m3 too, with the same
scales: in each ring slot the first ``key_width`` elements are a key (``k_scale``), the rest a value
(``v_scale``). Query-driven ThinK keeps each request's kept channel ids in ring cells
(:class:`kvcomp.methods.layout.RequestChannels`); in an fp8 ring those cells hold the id itself as
a byte (ids < 256: every supported head size), not an e4m3 value.

A method object reads and writes float views; :class:`Fp8Pages` hands it a compact float copy of
the blocks the step addresses (its block table and its new slots, the step's block ids renumbered
into that copy) and of the step's rings, and the step's keys and values rounded to what the pages
hold; after the method ran it stores the blocks that took new tokens and the rings back as fp8 (a
dequantised fp8 value requantises to itself, so untouched tokens are unchanged). Every K/V the
attention reads is then the e4m3 value of its page or ring: attention equals the reference over
dequantised pages (:func:`kvcomp.ref.fp8.paged_attention_fp8`).

Code pages (A²ATS) hold no K/V: a code is an int16 in a 2-byte cell whatever the page dtype, and
the host mirror keeps the model dtype (its bytes are not fp8). Without a ring (A²ATS, DuoAttention
+ A²ATS) such a layer is not wrapped: nothing it reads is fp8, so nothing is rounded. With ThinK's
window ring beside the codes (ThinK + A²ATS, all three) the ring is e4m3 like any ring, and the
wrapper hands the method the step's K/V rounded to e4m3 for the host pages too: every K/V the
attention reads (ring, host pages, the step's own) is then an e4m3 value, as with the other ring
methods, held in the model dtype on the host.
"""

from __future__ import annotations

import torch

from ..ref.fp8 import dequantize_fp8, quantize_fp8
from .step import Step, Store


class Fp8Pages:
    """fp8 pages (and ring) of one layer: ``k_scale``, ``v_scale``, the float ``dtype`` the method
    sees, ``key_width`` key elements per ring slot (the head size), and ``ids`` = ``(ring heads,
    slots, elements)`` of the ring cells holding channel ids as bytes (cell ``i`` at ``(heads[i],
    slots[i])``: :func:`kvcomp.methods.layout.ring_id_cells`; None: no such cells)."""

    def __init__(self, k_scale: float, v_scale: float, dtype: torch.dtype, key_width: int | None = None,
                 ids: tuple[list[int], list[int], int] | None = None):
        self.k_scale, self.v_scale, self.dtype = float(k_scale), float(v_scale), dtype
        self.key_width, self.ids = key_width, ids

    def round(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """``x`` as an fp8 page holds it (e4m3 of ``x / scale``, times ``scale``), in ``x``'s dtype."""
        return dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype)

    def _compact(self, pages: Store, block_table: torch.Tensor, slots: torch.Tensor):
        """``(float store of the used blocks, block ids -> compact ids [num_blocks], used blocks,
        compact ids of the blocks ``slots`` write)``."""
        num_blocks, block_size = pages.k.shape[0], pages.k.shape[1]
        live = slots.long()
        live = live[live >= 0]
        written = torch.unique(torch.div(live, block_size, rounding_mode="floor"))
        used = torch.unique(torch.cat([block_table.long().flatten().clamp(0, num_blocks - 1), written]))
        new_id = torch.full((num_blocks,), -1, dtype=torch.long, device=used.device)
        new_id[used] = torch.arange(used.numel(), device=used.device)
        store = Store(k=dequantize_fp8(pages.k[used], self.k_scale, self.dtype),
                      v=dequantize_fp8(pages.v[used], self.v_scale, self.dtype))
        return store, new_id, used, new_id[written]

    @staticmethod
    def _slots(slots: torch.Tensor, new_id: torch.Tensor, block_size: int) -> torch.Tensor:
        s = slots.long()
        moved = new_id[torch.div(s.clamp(min=0), block_size, rounding_mode="floor")] * block_size + s % block_size
        return torch.where(s >= 0, moved, s).to(slots.dtype)

    def _store_back(self, pages: Store, store: Store, used: torch.Tensor, local: torch.Tensor) -> None:
        if local.numel():
            blocks = used[local]
            pages.k[blocks] = quantize_fp8(store.k[local], self.k_scale)
            pages.v[blocks] = quantize_fp8(store.v[local], self.v_scale)

    def ring_in(self, ring: torch.Tensor) -> torch.Tensor:
        """Float values of fp8 ring blocks ``[n, H, slots, C]`` (``uint8``)."""
        if self.key_width is None:
            raise ValueError("Fp8Pages: an fp8 ring needs key_width (key elements per ring slot)")
        kw = self.key_width
        out = torch.empty(ring.shape, dtype=self.dtype, device=ring.device)
        out[..., :kw] = dequantize_fp8(ring[..., :kw], self.k_scale, self.dtype)
        out[..., kw:] = dequantize_fp8(ring[..., kw:], self.v_scale, self.dtype)
        if self.ids is not None:
            h, s, w = self.ids
            out[:, h, s, :w] = ring[:, h, s, :w].to(self.dtype)
        return out

    def ring_out(self, ring: torch.Tensor) -> torch.Tensor:
        """fp8 bytes of float ring blocks (:meth:`ring_in`'s inverse on its values)."""
        kw = self.key_width
        out = torch.cat([quantize_fp8(ring[..., :kw], self.k_scale), quantize_fp8(ring[..., kw:], self.v_scale)], -1)
        if self.ids is not None:
            h, s, w = self.ids
            out[:, h, s, :w] = ring[:, h, s, :w].float().round().clamp(0, 255).to(torch.uint8)
        return out

    def write(self, method, pages: Store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``method.write`` of ``k, v`` at ``slots`` (negative: skipped) into the fp8 ``pages`` (code pages:
        the host pages take ``k, v`` rounded to e4m3)."""
        if pages.k is None:
            method.write(pages, slots, self.round(k, self.k_scale), self.round(v, self.v_scale))
            return
        empty = torch.empty(0, dtype=torch.long, device=slots.device)
        store, new_id, used, local = self._compact(pages, empty, slots)
        method.write(store, self._slots(slots, new_id, pages.k.shape[1]), k, v)
        self._store_back(pages, store, used, local)

    def attend(self, method, pages: Store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step,
               out: torch.Tensor) -> None:
        """``method.attend`` over the dequantised blocks and rings of ``step`` with the step's K/V
        rounded to fp8; blocks it wrote and the rings go back as fp8 (code pages: used as they are)."""
        if pages.k is None:
            store, compact = Store(codes=pages.codes), step
        else:
            store, new_id, used, local = self._compact(pages, step.block_table, step.slot_mapping)
            bt = new_id[step.block_table.long().clamp(0, pages.k.shape[0] - 1)].to(step.block_table.dtype)
            compact = Step(step.num_reqs, step.num_actual_tokens, step.max_query_len, step.max_seq_len,
                           step.query_start_loc, step.seq_lens, bt,
                           self._slots(step.slot_mapping, new_id, pages.k.shape[1]), step.query_start_loc_host)
        store.mirror, store.chan = pages.mirror, pages.chan
        ring_used = None
        if pages.ring is not None:
            ring_used, store.ring_block = torch.unique(pages.ring_block.long(), return_inverse=True)
            store.ring = self.ring_in(pages.ring[ring_used])
        method.attend(store, q, self.round(k, self.k_scale), self.round(v, self.v_scale), compact, out)
        if pages.k is not None:
            self._store_back(pages, store, used, local)
        if ring_used is not None:
            pages.ring[ring_used] = self.ring_out(store.ring)
