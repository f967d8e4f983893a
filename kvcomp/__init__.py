"""kvcomp: KV-cache compression with real memory savings (DuoAttention, ThinK, A2ATS)."""

__version__ = "0.1.0"
