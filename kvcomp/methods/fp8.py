"""fp8 K/V pages for a method object: the step's blocks dequantised on read, written blocks requantised.

vLLM's ``--kv-cache-dtype fp8`` gives a layer ``uint8`` pages and one key and one value scale
(:mod:`kvcomp.ref.fp8`). A method object reads and writes float page views; :class:`Fp8Pages`
hands it a compact float copy of the blocks the step addresses (its block table and its new
slots), with the step's block ids renumbered into that copy, and after the method ran stores the
blocks that took new tokens back as fp8 (a dequantised fp8 value requantises to itself, so the
other tokens of those blocks are unchanged). Attention then equals the reference over dequantised
pages (:func:`kvcomp.ref.fp8.paged_attention_fp8`). Code pages (A²ATS) are not wrapped: a code is
an int16 in a 2-byte cell whatever the page dtype, and the host mirror keeps the activation dtype.
"""

from __future__ import annotations

import torch

from ..ref.fp8 import dequantize_fp8, quantize_fp8
from .step import Step, Store


class Fp8Pages:
    """fp8 pages of one layer: ``k_scale``, ``v_scale`` and the float ``dtype`` the method sees."""

    def __init__(self, k_scale: float, v_scale: float, dtype: torch.dtype):
        self.k_scale, self.v_scale, self.dtype = float(k_scale), float(v_scale), dtype

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

    def write(self, method, pages: Store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``method.write`` of ``k, v`` at ``slots`` (all valid) into the fp8 ``pages``."""
        empty = torch.empty(0, dtype=torch.long, device=slots.device)
        store, new_id, used, local = self._compact(pages, empty, slots)
        method.write(store, self._slots(slots, new_id, pages.k.shape[1]), k, v)
        self._store_back(pages, store, used, local)

    def attend(self, method, pages: Store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step,
               out: torch.Tensor) -> None:
        """``method.attend`` over the dequantised blocks of ``step``; blocks it wrote go back as fp8."""
        store, new_id, used, local = self._compact(pages, step.block_table, step.slot_mapping)
        bt = new_id[step.block_table.long().clamp(0, pages.k.shape[0] - 1)].to(step.block_table.dtype)
        compact = Step(step.num_reqs, step.num_actual_tokens, step.max_query_len, step.max_seq_len,
                       step.query_start_loc, step.seq_lens, bt,
                       self._slots(step.slot_mapping, new_id, pages.k.shape[1]), step.query_start_loc_host)
        store.ring, store.ring_block, store.mirror = pages.ring, pages.ring_block, pages.mirror
        method.attend(store, q, k, v, compact, out)
        self._store_back(pages, store, used, local)
