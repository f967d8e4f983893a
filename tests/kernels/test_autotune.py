"""The autotuned sparse decode kernel: keyed by head dims and GQA group (never by batch or length), its
configs pruned to the register budget, one config under the interpreter."""

import torch


def test_sparse_decode_autotune_key_and_configs():
    from kvcomp.kernels import _common as C
    from kvcomp.kernels import vq_sparse_decode as VS

    tuner = VS._sparse_decode_kernel
    assert tuner.keys == ["G", "D", "DV"]
    # under the interpreter only the first config exists: no benchmark, no repeated launches
    assert C.interpreting() and len(tuner.configs) == 1 and tuner.configs[0].kwargs == {"BLOCK_N": 16}

    def fits(dtype, d):
        q = torch.empty(1, 1, d, dtype=dtype)
        kept = VS._fits(VS._CONFIGS, {"q_ptr": q}, BLOCK_D=d, BLOCK_DV=d)
        return [(c.kwargs["BLOCK_N"], c.num_warps) for c in kept]

    assert fits(torch.bfloat16, 128) == [(16, 4), (16, 8), (32, 4), (32, 8), (64, 8)]
    assert fits(torch.float16, 256) == [(16, 4), (16, 8), (32, 4), (32, 8)]
    assert fits(torch.float32, 128) == [(16, 4), (16, 8), (32, 8)]
    assert fits(torch.float32, 256) == [(16, 8)]  # 16 rows of fp32 at D = 256 spill with 4 warps
