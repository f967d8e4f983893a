"""Rotary position embedding references in the Hugging Face Llama convention.

``cos/sin = cat(freqs, freqs)`` with ``freqs = pos * inv_freq`` (fp32, as HF computes them), and
``apply_rope(x) = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``.
"""

from __future__ import annotations

import torch

from . import _validate as V


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _check_inv_freq(inv_freq: torch.Tensor) -> None:
    V.tensor("inv_freq", inv_freq, ndim=1, kind="float")
    if inv_freq.shape[0] == 0:
        raise ValueError("inv_freq must not be empty")


def _check_scaling(attention_scaling) -> float:
    if isinstance(attention_scaling, bool) or not isinstance(attention_scaling, (int, float)) or not attention_scaling > 0:
        raise ValueError(f"attention_scaling must be a positive float, got {attention_scaling!r}")
    return float(attention_scaling)


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables for positions ``pos``.

    Args:
        pos: ``[...]`` positions (integer or float tensor, or a Python int).
        inv_freq: ``[D/2]`` inverse frequencies.
        attention_scaling: multiplier applied to both tables (HF ``attention_scaling``).
    Returns:
        ``(cos, sin)`` each ``[..., D]`` fp32, ``cat(freqs, freqs)`` layout.
    """
    _check_inv_freq(inv_freq)
    s = _check_scaling(attention_scaling)
    if isinstance(pos, int) and not isinstance(pos, bool):
        pos = torch.tensor(pos, device=inv_freq.device)
    V.tensor("pos", pos)
    if pos.dtype == torch.bool or pos.is_complex():
        raise ValueError(f"pos must be an integer or float tensor, got {pos.dtype}")
    V.same_device(pos=pos, inv_freq=inv_freq)
    freqs = pos.float().unsqueeze(-1) * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * s, emb.sin() * s


def _check_x_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    V.tensor("x", x, kind="float")
    V.tensor("cos", cos, kind="float")
    V.tensor("sin", sin, kind="float")
    V.same_device(x=x, cos=cos, sin=sin)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dim, got shape {tuple(x.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    try:
        out = torch.broadcast_shapes(x.shape, cos.shape)
    except RuntimeError:
        out = None
    if out != x.shape:
        raise ValueError(f"cos/sin of shape {tuple(cos.shape)} do not broadcast to x {tuple(x.shape)}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by RoPE.

    Args:
        x: ``[..., D]`` (e.g. ``[B, H, T, D]``).
        cos, sin: broadcastable to ``x`` (e.g. ``[T, D]`` or ``[B, 1, T, D]``), from :func:`rope_cos_sin`.
    Returns:
        ``x * cos + rotate_half(x) * sin`` in ``x.dtype`` (computed in fp32).
    """
    _check_x_cos_sin(x, cos, sin)
    xf = x.float()
    return (xf * cos.float() + _rotate_half(xf) * sin.float()).to(x.dtype)


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`apply_rope` with the same tables (``attention_scaling`` included).

    Args:
        x: ``[..., D]`` rotated tensor; cos, sin: as given to :func:`apply_rope`.
    Returns:
        ``(x * cos - rotate_half(x) * sin) / (cos^2 + sin^2)`` in ``x.dtype``.
    """
    _check_x_cos_sin(x, cos, sin)
    xf, c, s = x.float(), cos.float(), sin.float()
    return ((xf * c - _rotate_half(xf) * s) / (c * c + s * s)).to(x.dtype)


def windowed_rope_query(q_pre: torch.Tensor, inv_freq: torch.Tensor, rel_pos: int = 2048,
                        attention_scaling: float = 1.0) -> torch.Tensor:
    """A²ATS windowed-RoPE query: ``q~ = R(rel_pos) q_pre``.

    For pre-RoPE keys ``k_pre``, ``q~ . k_pre`` equals the post-RoPE logit numerator
    ``(R(p) q_pre) . (R(p - rel_pos) k_pre)`` for any ``p``: every key is scored as if it sat
    ``rel_pos`` tokens back. With ``attention_scaling = s`` HF scales both q and k by ``s``, so the
    result carries ``s^2`` to keep that identity.

    Args:
        q_pre: ``[..., D]`` pre-RoPE queries.
        inv_freq: ``[D/2]``.
        rel_pos: the fixed relative distance (A²ATS ``wrope_relative_pos``, default 2048).
        attention_scaling: HF RoPE ``attention_scaling``.
    Returns:
        ``[..., D]`` in ``q_pre.dtype``.
    """
    V.tensor("q_pre", q_pre, kind="float")
    _check_inv_freq(inv_freq)
    s = _check_scaling(attention_scaling)
    if isinstance(rel_pos, bool) or not isinstance(rel_pos, int):
        raise ValueError(f"rel_pos must be an int, got {rel_pos!r}")
    if q_pre.dim() < 1 or q_pre.shape[-1] != 2 * inv_freq.shape[0]:
        raise ValueError(f"q_pre last dim must be 2 * len(inv_freq) = {2 * inv_freq.shape[0]}, got {tuple(q_pre.shape)}")
    V.same_device(q_pre=q_pre, inv_freq=inv_freq)
    cos, sin = rope_cos_sin(torch.tensor(rel_pos, device=q_pre.device), inv_freq, s * s)
    return apply_rope(q_pre, cos, sin)
