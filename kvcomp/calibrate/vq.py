"""A²ATS codebook calibration: query-aware VQ of pre-RoPE keys, one codebook per (layer, KV head).

The model runs on calibration text (prose from ``pydoc_data.topics`` plus random UUID strings, like
A²ATS's FineWeb-Edu + UUID mix). Forward hooks on each attention module's ``k_proj`` / ``q_proj``
capture pre-RoPE keys ``[T, Hkv, D]`` and queries ``[T, Hq, D]``; queries are rotated once by the
windowed RoPE (``q~ = R(rel_pos) q_pre``) and each KV head's codebook is fitted with
``kvcomp.calibrate.codebook.fit_codebook(k_pre, q~ of its query group, n_codes)``: k-means on whitened keys, where
the whitening ``L`` is the Cholesky factor of the group's query second moment.

Stored as safetensors: ``codebook [L, Hkv, C, D]`` fp32, ``whiten [L, Hkv, D, D]`` fp32 (the ``L``
factors) and string metadata (``n_codes``, ``rel_pos``, ``model``, ``tokens``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .. import cli_args as T
from .. import defaults as DEF
from ..ref.rope import windowed_rope_query
from ..ref.vq import MAX_CODES, vq_encode
from .codebook import fit_codebook

__all__ = [
    "VQ_FORMAT",
    "add_vq_args",
    "calibrate_codebooks",
    "capture_qk",
    "load_codebooks",
    "main_vq",
    "quantization_error",
    "run_vq",
    "save_codebooks",
]

VQ_FORMAT = "kvcomp-vq-1"


def _attention_modules(model) -> list:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and hasattr(m, "q_proj")]
    if not mods:
        raise ValueError("model has no attention modules with layer_idx, q_proj and k_proj (Llama-like decoder expected)")
    return sorted(mods, key=lambda m: m.layer_idx)


@torch.no_grad()
def capture_qk(model, samples: list[torch.Tensor], *, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE keys and queries of every layer on calibration text.

    Args:
        model: Llama-like causal LM (attention modules with ``q_proj``/``k_proj``; a ``q_norm`` /
            ``k_norm`` applied per head before RoPE, as in Qwen3, is applied too).
        samples: list of ``[1, t_i]`` int64 token ids.
    Returns:
        ``(keys [L, N, Hkv, D], queries [L, N, Hq, D])`` fp32 on CPU, ``N = sum t_i``.
    """
    from ..models import model_geometry

    if not samples:
        raise ValueError("samples must be a non-empty list of [1, t] token tensors")
    for i, s in enumerate(samples):
        if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.shape[0] != 1 or s.shape[1] < 1 or s.is_floating_point():
            raise ValueError(f"samples[{i}] must be an integer tensor [1, t], got {getattr(s, 'shape', type(s))}")
    geo = model_geometry(model)
    nl, hq, hkv, d = geo["num_layers"], geo["num_q_heads"], geo["num_kv_heads"], geo["head_dim"]
    mods = _attention_modules(model)
    if len(mods) != nl:
        raise ValueError(f"found {len(mods)} attention modules, config says {nl} layers")
    n = sum(int(s.shape[1]) for s in samples)
    keys = torch.empty(nl, n, hkv, d, dtype=torch.float32)
    queries = torch.empty(nl, n, hq, d, dtype=torch.float32)
    cursor = [0, 0]  # [start, length] of the sample being run

    def hook(buf, heads, norm_name):
        def fn(mod, inp, out):
            attn = mods_by_proj[id(mod)]
            x = out[0].view(-1, heads, d)
            norm = getattr(attn, norm_name, None)
            if norm is not None:
                x = norm(x)
            s, t = cursor
            buf[attn.layer_idx, s:s + t] = x.float().cpu()
        return fn

    mods_by_proj = {}
    handles = []
    try:
        for m in mods:
            mods_by_proj[id(m.k_proj)] = m
            mods_by_proj[id(m.q_proj)] = m
            handles.append(m.k_proj.register_forward_hook(hook(keys, hkv, "k_norm")))
            handles.append(m.q_proj.register_forward_hook(hook(queries, hq, "q_norm")))
        device = next(model.parameters()).device
        from tqdm.auto import tqdm

        for s in tqdm(samples, desc="vq capture", disable=not progress, dynamic_ncols=True):
            cursor[1] = int(s.shape[1])
            model(input_ids=s.to(device), use_cache=False, logits_to_keep=1)
            cursor[0] += cursor[1]
    finally:
        for h in handles:
            h.remove()
    return keys, queries


def quantization_error(k_pre: torch.Tensor, codebook: torch.Tensor, whiten: torch.Tensor) -> dict:
    """Whitened quantisation error of keys ``k_pre [N, Hkv, D]`` under ``codebook [Hkv, C, D]`` and
    ``whiten [Hkv, D, D]``.

    ``rel_err`` = sum ||(k - c(k)) L||^2 / sum ||k L||^2 (the relative MSE of approximate logits
    ``q~.c`` vs ``q~.k`` over the calibration queries); ``rel_err_centered`` divides by the spread
    of the keys around their mean instead (softmax ignores the logit shared by all keys).
    Returns per-head lists and their means.
    """
    kt = k_pre.float().permute(1, 0, 2).unsqueeze(0)  # [1, Hkv, N, D]
    codes = vq_encode(kt, codebook, whiten)[0].long()  # [Hkv, N]
    rec = torch.stack([codebook[h].float()[codes[h]] for h in range(codebook.shape[0])])  # [Hkv, N, D]
    lw = whiten.float()
    k = kt[0]
    err = torch.matmul(k - rec, lw).pow(2).sum((1, 2))
    tot = torch.matmul(k, lw).pow(2).sum((1, 2))
    cen = torch.matmul(k - k.mean(1, keepdim=True), lw).pow(2).sum((1, 2))
    used = [int(torch.unique(codes[h]).numel()) for h in range(codes.shape[0])]
    r = (err / tot).tolist()
    rc = (err / cen).tolist()
    return {"rel_err": r, "rel_err_centered": rc, "mean_rel_err": sum(r) / len(r),
            "mean_rel_err_centered": sum(rc) / len(rc), "codes_used": used}


def calibrate_codebooks(
    model,
    samples: list[torch.Tensor],
    *,
    n_codes: int = 1024,
    iters: int = 25,
    rel_pos: int = 2048,
    seed: int = 0,
    eval_samples: list[torch.Tensor] | None = None,
    progress: bool = True,
) -> dict:
    """Fit A²ATS codebooks for every (layer, KV head) of the global layers (each with its own RoPE,
    :func:`kvcomp.arch.layer_rope`); sliding-window layers are skipped (kvcomp leaves them exact):
    their rows are placeholders (zero codebooks, identity whitening) no config uses.

    Args:
        model: Llama-like causal LM (run on its current device).
        samples: calibration token tensors ``[1, t_i]`` (``sum t_i >= n_codes``).
        n_codes: codebook size C (<= 32768). iters: k-means Lloyd iterations. rel_pos: WRoPE
            distance. seed: k-means++ seed (head ``(l, h)`` uses ``seed + l * Hkv + h``).
        eval_samples: optional held-out token tensors; their keys give ``stats["heldout"]``.
    Returns:
        dict with ``codebook [L, Hkv, C, D]`` fp32, ``whiten [L, Hkv, D, D]`` fp32, ``n_codes``,
        ``rel_pos``, ``tokens`` (calibration tokens), ``seconds`` and ``stats`` (see
        ``quantization_error``: ``calib`` and, with ``eval_samples``, ``heldout``).
    """
    from ..models import model_geometry

    if isinstance(n_codes, bool) or not isinstance(n_codes, int) or not 1 <= n_codes <= MAX_CODES:
        raise ValueError(f"n_codes must be an int in [1, {MAX_CODES}], got {n_codes!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if isinstance(rel_pos, bool) or not isinstance(rel_pos, int) or rel_pos < 0:
        raise ValueError(f"rel_pos must be an int >= 0, got {rel_pos!r}")
    n_tok = sum(int(s.shape[1]) for s in samples) if samples else 0
    if n_tok < n_codes:
        raise ValueError(f"{n_tok} calibration tokens are fewer than n_codes={n_codes}")
    t0 = time.perf_counter()
    from ..arch import layer_rope, layer_windows

    geo = model_geometry(model)
    nl, hkv, g, d = geo["num_layers"], geo["num_kv_heads"], geo["group_size"], geo["head_dim"]
    glob = [l for l, w in enumerate(layer_windows(model.config)) if w is None]  # sliding layers stay exact
    device = next(model.parameters()).device
    keys, queries = capture_qk(model, samples, progress=progress)
    codebook = torch.zeros(nl, hkv, n_codes, d, dtype=torch.float32)  # sliding layers: placeholders, never used
    whiten = torch.eye(d).expand(nl, hkv, d, d).clone()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(glob) * hkv, desc=f"vq k-means C={n_codes}", disable=not progress, dynamic_ncols=True)
    for l in glob:
        inv_freq, scaling = layer_rope(model.config, l, d)
        qw = windowed_rope_query(queries[l].to(device), inv_freq.to(device), rel_pos, scaling)
        for h in range(hkv):
            k = keys[l, :, h].to(device)
            q = qw[:, h * g:(h + 1) * g].reshape(-1, d)
            cb, lw = fit_codebook(k, q, n_codes, iters=iters, seed=seed + l * hkv + h)
            codebook[l, h] = cb.cpu()
            whiten[l, h] = lw.cpu()
            bar.update(1)
    bar.close()
    del queries
    stats = {"calib": _stats(keys[glob], codebook[glob], whiten[glob])}
    if eval_samples:
        ek, _ = capture_qk(model, eval_samples, progress=False)
        stats["heldout"] = _stats(ek[glob], codebook[glob], whiten[glob])
    return {"codebook": codebook, "whiten": whiten, "n_codes": n_codes, "rel_pos": rel_pos, "tokens": n_tok,
            "iters": iters, "seed": seed, "seconds": time.perf_counter() - t0, "stats": stats}


def _stats(keys: torch.Tensor, codebook: torch.Tensor, whiten: torch.Tensor) -> dict:
    per = [quantization_error(keys[l], codebook[l], whiten[l]) for l in range(keys.shape[0])]
    r = [x["mean_rel_err"] for x in per]
    rc = [x["mean_rel_err_centered"] for x in per]
    used = [u for x in per for u in x["codes_used"]]
    return {"mean_rel_err": sum(r) / len(r), "mean_rel_err_centered": sum(rc) / len(rc),
            "layer_rel_err_centered": [round(x, 4) for x in rc],
            "min_codes_used": min(used), "mean_codes_used": sum(used) / len(used), "tokens": int(keys.shape[1])}


# ---------------------------------------------------------------------------------------------
# file format


def save_codebooks(path: str | os.PathLike, codebook: torch.Tensor, whiten: torch.Tensor, *, rel_pos: int = 2048,
                   model: str = "", tokens: int = 0, extra: dict | None = None) -> None:
    """Write ``codebook [L, Hkv, C, D]`` and ``whiten [L, Hkv, D, D]`` (fp32) to a safetensors file.

    Metadata (strings): ``format``, ``n_codes``, ``rel_pos``, ``model``, ``tokens``, plus ``extra``
    (JSON-encoded under key ``extra``). Written atomically (temporary file + rename).
    """
    from safetensors.torch import save_file

    _check_tensors(codebook, whiten, where="save_codebooks")
    if isinstance(rel_pos, bool) or not isinstance(rel_pos, int) or rel_pos < 0:
        raise ValueError(f"rel_pos must be an int >= 0, got {rel_pos!r}")
    meta = {"format": VQ_FORMAT, "n_codes": str(codebook.shape[2]), "rel_pos": str(rel_pos),
            "model": str(model), "tokens": str(int(tokens)), "extra": json.dumps(extra or {}, sort_keys=True)}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file({"codebook": codebook.detach().float().contiguous().cpu(),
               "whiten": whiten.detach().float().contiguous().cpu()}, tmp, metadata=meta)
    os.replace(tmp, path)


def _check_tensors(codebook: torch.Tensor, whiten: torch.Tensor, *, where: str) -> None:
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 4 or not codebook.is_floating_point():
        raise ValueError(f"{where}: codebook must be a float tensor [L, Hkv, C, D], got {getattr(codebook, 'shape', type(codebook))}")
    if not isinstance(whiten, torch.Tensor) or whiten.dim() != 4 or not whiten.is_floating_point():
        raise ValueError(f"{where}: whiten must be a float tensor [L, Hkv, D, D], got {getattr(whiten, 'shape', type(whiten))}")
    nl, hkv, c, d = codebook.shape
    if tuple(whiten.shape) != (nl, hkv, d, d):
        raise ValueError(f"{where}: whiten must be [L={nl}, Hkv={hkv}, D={d}, D={d}] to match codebook, got {tuple(whiten.shape)}")
    if not 1 <= c <= MAX_CODES:
        raise ValueError(f"{where}: codebook has {c} codes, need 1..{MAX_CODES} (codes are int16)")
    if not (torch.isfinite(codebook).all() and torch.isfinite(whiten).all()):
        raise ValueError(f"{where}: codebook/whiten contain NaN or inf")


def load_codebooks(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict:
    """Read a file written by ``save_codebooks``.

    Returns:
        dict with ``codebook [L, Hkv, C, D]`` fp32, ``whiten [L, Hkv, D, D]`` fp32, ``n_codes``,
        ``rel_pos``, ``model``, ``tokens`` and ``extra`` (dict).
    Raises:
        FileNotFoundError if missing; ValueError on a wrong format, missing tensors, bad shapes or
        dtypes, or metadata that disagrees with the tensors.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQ codebook file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            missing = {"codebook", "whiten"} - names
            if missing:
                raise ValueError(f"{path}: missing tensors {sorted(missing)} (has {sorted(names)})")
            codebook = f.get_tensor("codebook")
            whiten = f.get_tensor("whiten")
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types on a corrupt header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    fmt = meta.get("format")
    if fmt is not None and fmt != VQ_FORMAT:  # no format key: written by VQRetrieval.save (same tensors)
        raise ValueError(f"{path}: format {fmt!r}, expected {VQ_FORMAT!r}")
    for name, t in (("codebook", codebook), ("whiten", whiten)):
        if t.dtype != torch.float32:
            raise ValueError(f"{path}: {name} has dtype {t.dtype}, expected torch.float32")
    _check_tensors(codebook, whiten, where=path)
    try:
        n_codes = int(meta.get("n_codes", codebook.shape[2]))
        rel_pos = int(meta.get("rel_pos", "2048"))
        tokens = int(meta.get("tokens", "0"))
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: bad metadata ({e})") from None
    if n_codes != codebook.shape[2]:
        raise ValueError(f"{path}: metadata n_codes={n_codes} but codebook has {codebook.shape[2]} codes")
    return {"codebook": codebook.to(device), "whiten": whiten.to(device), "n_codes": n_codes, "rel_pos": rel_pos,
            "model": meta.get("model", ""), "tokens": tokens, "extra": extra}


# ---------------------------------------------------------------------------------------------
# command line (called by `kvcomp calibrate vq`)


def add_vq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``kvcomp calibrate vq`` options to ``parser``."""
    parser.add_argument("--model", default="smollm2-135m", help="registry name or local HF folder")
    parser.add_argument("--output", default=None, help="output .safetensors (default vq_codebooks/<model>-c<C>.safetensors)")
    parser.add_argument("--n-codes", type=T.int_in(1, MAX_CODES), default=1024, help="codebook size per (layer, KV head); A²ATS uses 4096")
    parser.add_argument("--tokens", type=T.positive_int, default=8192, help="calibration tokens (A²ATS: 64K prose + 16K UUID)")
    parser.add_argument("--sample-len", type=T.positive_int, default=2048, help="tokens per forward pass")
    parser.add_argument("--uuid-fraction", type=T.fraction, default=0.2, help="share of random-UUID text")
    parser.add_argument("--iters", type=T.positive_int, default=25, help="k-means iterations (A²ATS: up to 300)")
    parser.add_argument("--rel-pos", type=T.nonneg_int, default=DEF.VQ_REL_POS, help="windowed-RoPE distance")
    parser.add_argument("--eval-tokens", type=T.nonneg_int, default=2048, help="held-out prose tokens for the error report (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_vq(args: argparse.Namespace) -> dict:
    """Run ``kvcomp calibrate vq``: load the model, capture keys/queries, fit, write the file."""
    from ..models import load_model
    from .data import make_text_samples

    if args.tokens < args.n_codes:
        raise ValueError(f"--tokens {args.tokens} must be >= --n-codes {args.n_codes}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(args.model, device=device)
    samples = make_text_samples(tok, args.tokens, sample_len=args.sample_len, uuid_fraction=args.uuid_fraction,
                                seed=args.seed)
    held = None
    if args.eval_tokens > 0:
        held = make_text_samples(tok, args.eval_tokens, sample_len=args.sample_len, uuid_fraction=0.0,
                                 seed=args.seed + 7919)
    res = calibrate_codebooks(model, samples, n_codes=args.n_codes, iters=args.iters, rel_pos=args.rel_pos,
                              seed=args.seed, eval_samples=held, progress=not args.no_progress)
    name = os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model) else args.model
    out = args.output or os.path.join("vq_codebooks", f"{name}-c{args.n_codes}.safetensors")
    extra = {"iters": args.iters, "seed": args.seed, "sample_len": args.sample_len,
             "uuid_fraction": args.uuid_fraction, "seconds": round(res["seconds"], 1), "device": str(device),
             "stats": {k: {kk: vv for kk, vv in v.items() if kk != "layer_rel_err_centered"}
                       for k, v in res["stats"].items()}}
    save_codebooks(out, res["codebook"], res["whiten"], rel_pos=args.rel_pos, model=args.model,
                   tokens=res["tokens"], extra=extra)
    size = os.path.getsize(out)
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {res['seconds']:.0f} s)")
    print(json.dumps(extra["stats"]))
    res["path"] = out
    return res


def main_vq(argv: list[str] | None = None) -> int:
    """``python -m kvcomp.calibrate.vq``: same options as ``kvcomp calibrate vq``."""
    p = add_vq_args(argparse.ArgumentParser(prog="kvcomp calibrate vq", description=__doc__.splitlines()[0]))
    run_vq(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_vq())
