"""The A²ATS host mirror (no vLLM needed): slot-addressed writes, budget refusal before allocating."""

from __future__ import annotations

import pytest
import torch

from kvcomp.methods.dense import write_pages
from kvcomp.vllm_plugin import mirror as M


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(M, "_mirrors", {})


def test_write_by_slot_and_views():
    m = M.mirror_for("l0", num_blocks=5, block_size=4, num_heads=2, head_size=16, head_size_v=16,
                     dtype=torch.float32, layers_in_process=2)
    assert M.mirror_for("l0", num_blocks=5, block_size=4, num_heads=2, head_size=16, head_size_v=16,
                        dtype=torch.float32, layers_in_process=2) is m
    m.kv.zero_()
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    slots = torch.tensor([17, 2, 8])  # block 4 offset 1, block 0 offset 2, block 2 offset 0
    write_pages(m.k, m.v, slots, k, v)  # how A2ATS writes its host pages
    assert torch.equal(m.k[4, 1], k[0]) and torch.equal(m.v[0, 2], v[1]) and torch.equal(m.k[2, 0], k[2])
    assert int((m.kv != 0).any(-1).any(-1).sum()) == 3
    assert M.mirror_bytes() == 5 * 4 * 2 * 32 * 4


def test_budget_refused_with_the_block_count_that_fits(monkeypatch):
    monkeypatch.setenv(M.ENV_HOST_GIB, "0.001")  # 1,073,741 bytes
    # one block of every layer: 16 tokens x 2 heads x (64 + 64) x 2 B x 2 layers = 16 KiB -> 65 blocks fit
    with pytest.raises(ValueError, match=r"at most 65 blocks \(--num-gpu-blocks-override 65"):
        M.mirror_for("l0", num_blocks=1000, block_size=16, num_heads=2, head_size=64, head_size_v=64,
                     dtype=torch.float16, layers_in_process=2)
    assert M.mirror_bytes() == 0  # nothing allocated


def test_budget_variable_checked(monkeypatch):
    monkeypatch.setenv(M.ENV_HOST_GIB, "lots")
    with pytest.raises(ValueError, match="KVCOMP_HOST_MIRROR_GIB must be a positive number"):
        M.host_budget_bytes()
    monkeypatch.delenv(M.ENV_HOST_GIB)
    assert 0 < M.host_budget_bytes() <= M.available_host_bytes()
