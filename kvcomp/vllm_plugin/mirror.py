"""The A²ATS host mirror: full K/V of every token whose VQ code sits in vLLM's device pages.

Design: a page-for-page shadow. Each A²ATS layer owns one host tensor
``[num_blocks, block_size, Hkv, D + Dv]`` (pinned when CUDA is present), block ``b`` of the mirror
holding the full K/V of the tokens whose codes live in vLLM's code block ``b``. vLLM's block
manager therefore owns every lifetime: when a request finishes, is aborted or preempted, its code
blocks go back to vLLM's free pool and their mirror blocks with them; a reused block is simply
overwritten. The backend keeps no per-request host state, so there is nothing to leak (the tests
check that the mirror's allocation does not change while requests come and go).

The price of the shadow is that the mirror is sized by vLLM's device block count: every code
block vLLM can hand out must have its host K/V. The budget is checked before the first allocation
(``KVCOMP_HOST_MIRROR_GIB``, default 90 % of the host's available memory); over it, the error says
how many blocks fit, so the user sizes vLLM's device KV budget (``--kv-cache-memory-bytes`` or
``--num-gpu-blocks-override``) to the host, which is A²ATS's real capacity limit.
"""

from __future__ import annotations

import os
import threading

import torch

ENV_HOST_GIB = "KVCOMP_HOST_MIRROR_GIB"

_lock = threading.Lock()
_mirrors: dict[str, "HostMirror"] = {}


def available_host_bytes() -> int:
    """``MemAvailable`` of this host (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_budget_bytes() -> int:
    """Host bytes the mirrors of this process may take: ``$KVCOMP_HOST_MIRROR_GIB`` or 90 % available.

    Raises:
        ValueError: the variable is not a positive number.
    """
    raw = os.environ.get(ENV_HOST_GIB, "").strip()
    if not raw:
        return int(0.9 * available_host_bytes())
    try:
        gib = float(raw)
    except ValueError:
        gib = -1.0
    if not gib > 0:
        raise ValueError(f"{ENV_HOST_GIB} must be a positive number of GiB, got {raw!r}")
    return int(gib * (1 << 30))


class HostMirror:
    """Host K/V of one layer, indexed like vLLM's pages: ``kv [num_blocks, block_size, Hkv, D + Dv]``."""

    def __init__(self, name: str, num_blocks: int, block_size: int, num_heads: int, head_size: int,
                 head_size_v: int, dtype: torch.dtype, pin: bool):
        self.name = name
        self.head_size = head_size
        self.kv = torch.empty(num_blocks, block_size, num_heads, head_size + head_size_v, dtype=dtype,
                              pin_memory=pin)

    @property
    def nbytes(self) -> int:
        return self.kv.untyped_storage().nbytes()

    @property
    def k(self) -> torch.Tensor:
        return self.kv[..., : self.head_size]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[..., self.head_size:]


def mirror_for(name: str, *, num_blocks: int, block_size: int, num_heads: int, head_size: int, head_size_v: int,
               dtype: torch.dtype, layers_in_process: int) -> HostMirror:
    """The mirror of layer ``name``, allocated on first use after a budget check for all layers.

    ``layers_in_process`` A²ATS layers will each allocate the same size, so the first allocation
    checks the whole process's need against :func:`host_budget_bytes`.

    Raises:
        ValueError: the mirrors of all layers would exceed the host budget (the message gives the
            block count that fits).
    """
    with _lock:
        m = _mirrors.get(name)
        if m is not None:
            if m.kv.shape[0] != num_blocks:
                raise RuntimeError(f"{name}: vLLM re-bound {num_blocks} blocks, mirror has {m.kv.shape[0]}")
            return m
        elem = torch.empty((), dtype=dtype).element_size()
        per_block = block_size * num_heads * (head_size + head_size_v) * elem
        need = per_block * num_blocks * max(layers_in_process, 1)
        have = sum(x.nbytes for x in _mirrors.values())
        budget = host_budget_bytes()
        if not _mirrors and need > budget:
            fit = budget // (per_block * max(layers_in_process, 1))
            raise ValueError(
                f"kvcomp A2ATS host mirror: {num_blocks} code blocks x {layers_in_process} layers need "
                f"{need / 2**30:.2f} GiB of host K/V (the full KV of every token vLLM's device pages can "
                f"index), over the {budget / 2**30:.2f} GiB budget (${ENV_HOST_GIB} or 90% of available "
                f"memory). Give vLLM at most {fit} blocks (--num-gpu-blocks-override {fit}, or a smaller "
                f"--kv-cache-memory-bytes) or raise ${ENV_HOST_GIB}")
        if _mirrors and have + per_block * num_blocks > budget:
            raise ValueError(f"kvcomp A2ATS host mirror for {name} would exceed the {budget / 2**30:.2f} GiB budget")
        m = HostMirror(name, num_blocks, block_size, num_heads, head_size, head_size_v, dtype,
                       pin=torch.cuda.is_available())
        _mirrors[name] = m
        return m


def mirror_bytes() -> int:
    """Host bytes held by every mirror of this process."""
    with _lock:
        return sum(m.nbytes for m in _mirrors.values())
