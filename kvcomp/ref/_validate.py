"""Input checks shared by the references: every failure is a ValueError naming the argument."""

from __future__ import annotations

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tensor(name: str, t, *, ndim: int | tuple[int, ...] | None = None, kind: str | None = None) -> torch.Tensor:
    """Check that ``t`` is a tensor with ``ndim`` dims and of ``kind`` ('float', 'int', 'bool')."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in dims:
            want = " or ".join(str(d) for d in dims)
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(t.shape)}")
    if kind == "float" and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if kind == "int" and t.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if kind == "bool" and t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    return t


def same_device(**tensors: torch.Tensor | None) -> None:
    """All given (non-None) tensors live on one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    dev = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev:
            raise ValueError(f"{n} is on {t.device} but {items[0][0]} is on {dev}")


def dim_eq(name: str, got: int, want: int, what: str) -> None:
    if got != want:
        raise ValueError(f"{name}: {what} must be {want}, got {got}")


def gqa(q_name: str, hq: int, hkv: int) -> int:
    """Return the group size G = hq // hkv, checking divisibility."""
    if hkv <= 0 or hq % hkv != 0:
        raise ValueError(f"{q_name}: number of query heads {hq} is not a multiple of KV heads {hkv}")
    return hq // hkv


def nonneg_int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{name} must be a non-negative int, got {x!r}")
    return x


def scale_or_default(scale, d: int) -> float:
    if scale is None:
        return 1.0 / float(d) ** 0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {scale!r}")
    return float(scale)


def positions(name: str, pos, b: int, t: int, device: torch.device) -> torch.Tensor:
    """Check a position tensor ``[t]`` or ``[b, t]`` and return it as int64 ``[b or 1, t]``."""
    tensor(name, pos, ndim=(1, 2), kind="int")
    if pos.shape[-1] != t or (pos.dim() == 2 and pos.shape[0] != b):
        raise ValueError(f"{name} must have shape [{t}] or [{b}, {t}], got {tuple(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device} but the tensors are on {device}")
    pos = pos.long()
    return pos if pos.dim() == 2 else pos.unsqueeze(0)


def query_positions(q_pos, b: int, tq: int, tk: int, device: torch.device, what: str = "Tk") -> torch.Tensor:
    """``q_pos`` checked, or the bottom-right default ``tk - tq + arange(tq)``, as ``[b or 1, tq]``."""
    if q_pos is not None:
        return positions("q_pos", q_pos, b, tq, device)
    if tq > tk:
        raise ValueError(f"q: Tq={tq} > {what}={tk} needs explicit q_pos")
    return (tk - tq + torch.arange(tq, device=device)).unsqueeze(0)


def key_positions(k_pos, b: int, tk: int, device: torch.device) -> torch.Tensor:
    """``k_pos`` checked, or the default ``arange(tk)``, as ``[b or 1, tk]``."""
    return torch.arange(tk, device=device).unsqueeze(0) if k_pos is None else positions("k_pos", k_pos, b, tk, device)


def paged(q, k_cache, v_cache, block_table, seq_lens, query_start_loc):
    """Validate a varlen-over-pages call; return (G, seq_lens list, query_start_loc list)."""
    tensor("q", q, ndim=3, kind="float")
    tensor("k_cache", k_cache, ndim=4, kind="float")
    tensor("v_cache", v_cache, ndim=4, kind="float")
    tensor("block_table", block_table, ndim=2, kind="int")
    tensor("seq_lens", seq_lens, ndim=1, kind="int")
    tensor("query_start_loc", query_start_loc, ndim=1, kind="int")
    same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens,
                query_start_loc=query_start_loc)
    nb, bs, hkv, d = k_cache.shape
    if tuple(v_cache.shape[:3]) != (nb, bs, hkv):
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} does not match k_cache {tuple(k_cache.shape)} "
                         "in [num_blocks, block_size, Hkv]")
    dim_eq("q", q.shape[2], d, "head dim (q.shape[2]) equal to k_cache.shape[3]")
    g = gqa("q", q.shape[1], hkv)
    bsz = block_table.shape[0]
    dim_eq("seq_lens", seq_lens.shape[0], bsz, "length (batch size of block_table)")
    dim_eq("query_start_loc", query_start_loc.shape[0], bsz + 1, "length (batch size + 1)")
    lens = [int(x) for x in seq_lens.tolist()]
    qsl = [int(x) for x in query_start_loc.tolist()]
    if qsl[0] != 0 or qsl[-1] != q.shape[0]:
        raise ValueError(f"query_start_loc must start at 0 and end at total_q={q.shape[0]}, got {qsl[0]}..{qsl[-1]}")
    for b in range(bsz):
        q_len = qsl[b + 1] - qsl[b]
        if q_len < 0:
            raise ValueError(f"query_start_loc must be non-decreasing (at sequence {b})")
        if lens[b] < q_len:
            raise ValueError(f"seq_lens[{b}]={lens[b]} is smaller than its query length {q_len}")
        check_blocks(block_table, b, lens[b], bs, nb)
    return g, lens, qsl


def check_blocks(block_table: torch.Tensor, b: int, seq_len: int, block_size: int, num_blocks: int) -> int:
    """Check that sequence ``b`` of ``seq_len`` tokens fits its block-table row; return #blocks used."""
    nblk = -(-seq_len // block_size)
    if nblk > block_table.shape[1]:
        raise ValueError(f"seq_lens[{b}]={seq_len} needs {nblk} blocks but block_table has {block_table.shape[1]} columns")
    if nblk:
        row = block_table[b, :nblk]
        lo, hi = int(row.min()), int(row.max())
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"block_table[{b}] has block ids in [{lo}, {hi}] outside [0, {num_blocks})")
    return nblk
