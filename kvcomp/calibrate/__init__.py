"""Calibration: DuoAttention gate training, A²ATS VQ codebooks, and their offline data.

Submodules import torch/transformers lazily enough that ``import kvcomp`` stays cheap; import
``kvcomp.calibrate`` only when calibrating.
"""

from .data import make_multi_passkey_sample as make_multi_passkey_sample
from .data import make_multi_passkey_samples as make_multi_passkey_samples
from .data import make_text_samples as make_text_samples
from .data import PasskeySample as PasskeySample
from .duo import add_duo_args as add_duo_args
from .duo import DUO_ATTN_NAME as DUO_ATTN_NAME
from .duo import duo_mixed_attention as duo_mixed_attention
from .duo import duo_training_mode as duo_training_mode
from .duo import gate_summary as gate_summary
from .duo import main_duo as main_duo
from .duo import run_duo as run_duo
from .duo import save_duo_pattern as save_duo_pattern
from .duo import train_gates as train_gates
from .vq import add_vq_args as add_vq_args
from .vq import calibrate_codebooks as calibrate_codebooks
from .vq import capture_qk as capture_qk
from .vq import load_codebooks as load_codebooks
from .vq import main_vq as main_vq
from .vq import run_vq as run_vq
from .vq import save_codebooks as save_codebooks

__all__ = [
    "DUO_ATTN_NAME",
    "PasskeySample",
    "add_duo_args",
    "add_vq_args",
    "calibrate_codebooks",
    "capture_qk",
    "duo_mixed_attention",
    "duo_training_mode",
    "gate_summary",
    "load_codebooks",
    "main_duo",
    "main_vq",
    "make_multi_passkey_sample",
    "make_multi_passkey_samples",
    "make_text_samples",
    "run_duo",
    "run_vq",
    "save_codebooks",
    "save_duo_pattern",
    "train_gates",
]
