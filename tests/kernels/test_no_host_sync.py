"""A decode step reads nothing back to the host per layer (issue 10): no ``.item()``, ``.tolist()``,
``int(t)``, ``bool(t)``, ``float(t)`` or tensor-as-index in a layer's page write and attention.

Per-step values (the request split, positions, ring indices) are computed by the step's first layer
and shared (vLLM's metadata builder makes the step once); so a first layer runs the step with those
reads allowed, then a second layer of the same step runs with every host read of a tensor raising.
CPU product route (native kernels, ``TRITON_INTERPRET=0``): on CUDA each such read is a device sync,
on the CPU a Python round trip per layer. Page writes include vLLM's padding rows (slot ``-1``),
skipped by the writes themselves (the vLLM backend passes its slot mapping through unfiltered).
"""

import pytest
import torch

from _decode_steps import METHODS, build, decode_inputs
from kvcomp.ops._dispatch import has_native

READS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")


class HostRead(AssertionError):
    pass


def _forbid_host_reads(monkeypatch):
    for name in READS:
        def raiser(self, *a, _name=name, **k):
            raise HostRead(f"Tensor.{_name} in a layer's decode step")

        monkeypatch.setattr(torch.Tensor, name, raiser)


def _padded_write(layer, k, v):
    """``method.write`` as the vLLM backend calls it: the step's slots plus two padding rows (-1)."""
    md = layer.md
    slots = torch.cat([md.slot_mapping, torch.full((2,), -1, dtype=md.slot_mapping.dtype)])
    pad = lambda x: torch.cat([x, torch.randn(2, *x.shape[1:])])  # noqa: E731
    layer.method.write(layer.store, slots, pad(k), pad(v), md)


@pytest.mark.parametrize("method", METHODS)
def test_second_layer_of_a_decode_step_reads_nothing_back(method, monkeypatch):
    if not has_native("duo_decode"):
        pytest.skip("kvcomp._C is not built")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    first, second, check = build(method, "cpu"), build(method, "cpu"), build(method, "cpu")
    second.md = check.md = first.md  # one step: its metadata shared by every layer, like vLLM's
    for layer in (second, check):
        if first.store.ring_block is not None:
            layer.store.ring_block = first.store.ring_block  # vLLM: the step's ring ids, one tensor
    q, k, v = decode_inputs("cpu", seed=3)
    out = torch.empty_like(q)
    _padded_write(first, k, v)
    first.method.attend(first.store, q, k, v, first.md, out)

    with monkeypatch.context() as mp:
        _forbid_host_reads(mp)
        got = torch.empty_like(q)
        _padded_write(second, k, v)
        second.method.attend(second.store, q, k, v, second.md, got)
    torch.testing.assert_close(got, out, rtol=0, atol=0)
    # the padding rows were skipped: the same pages as a write of the real rows only
    check.method.write(check.store, check.md.slot_mapping, k, v, check.md)
    check.method.attend(check.store, q, k, v, check.md, torch.empty_like(q))
    for (name, a), (_, b) in zip(second.store.tensors(), check.store.tensors()):
        assert torch.equal(a, b), name


def test_the_check_catches_a_host_read(monkeypatch):
    """The patched reads raise (so the test above can fail)."""
    with monkeypatch.context() as mp:
        _forbid_host_reads(mp)
        t = torch.tensor([1, -1])
        for read in (lambda: t.min().item(), lambda: int(t.min()), lambda: bool((t < 0).any()), lambda: t.tolist(),
                     lambda: [0, 1, 2][t[0]]):
            with pytest.raises(HostRead):
                read()


@pytest.mark.parametrize("slots", [[5, -1, 17, -1], [-1, -1], [-1, 3, 0], []], ids=["mixed", "all-padding",
                                                                                  "slot-0", "empty"])
def test_indexed_write_skips_padding_without_host_reads(slots, monkeypatch):
    """The GPU pages' write of unequal key / value widths (ThinK's narrow keys): padded rows change
    nothing, real rows land, with no host read (run here on CPU tensors)."""
    from kvcomp.methods.dense import indexed_write

    cache = torch.randn(4, 8, 2, 3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(len(slots), 2, 3, generator=torch.Generator().manual_seed(1))
    want = cache.clone()
    for i, s in enumerate(slots):
        if s >= 0:
            want[s // 8, s % 8] = x[i]
    s = torch.tensor(slots, dtype=torch.long)
    with monkeypatch.context() as mp:
        _forbid_host_reads(mp)
        indexed_write(cache, s, x)
    assert torch.equal(cache, want)
