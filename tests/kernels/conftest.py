"""Kernel tests run under the Triton CPU interpreter when there is no CUDA device.

The environment must be set before any ``kernels.*`` module is imported (``triton.jit`` decides at
decoration time whether a kernel is interpreted), which is why this happens at conftest import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
