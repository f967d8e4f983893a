"""Bench tests run the kernels under the Triton CPU interpreter when there is no CUDA device (set before
any ``kernels.*`` module is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
