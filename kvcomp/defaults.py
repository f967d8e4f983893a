"""Every default and limit of kvcomp, one constant each (config, CLI, methods, kernel launchers and
the vLLM backend read them from here)."""

# ---- limits
#: head dims every kernel takes (Triton tiles, native CPU kernels); the references accept any even size
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
#: VQ codes are int16 cells: codebooks of at most 2**15 codewords (codes 0..32767)
MAX_CODES = 32768

# ---- DuoAttention
DUO_SPARSITY = 0.5  # fraction of KV heads that stream
DUO_SINK = 64  # attention-sink tokens a streaming head keeps
DUO_RECENT = 256  # recent window a streaming head keeps (counting the query itself)

# ---- ThinK
THINK_PRUNE_RATIO = 0.4  # λ: fraction of key channels pruned
THINK_WINDOW = 32  # observation window / full-width recent keys
#: kept key channels are rounded up to a multiple of this (the next-best channels by score fill the extra
#: slots; capped at the head dim): λ=0.4 keeps 80 of 128 channels (37.5% pruned), 48 of 64 (25%), 160 of
#: 256 (37.5%); 1 keeps exactly D - floor(λ·D). A multiple of 16 makes a pruned key row whole 16-channel
#: vectors (aligned, unmasked loads in the Triton kernel; no tail in the native CPU kernel)
THINK_CHANNEL_MULTIPLE = 16
#: kept channels chosen per request from the prompt's last queries (ThinK as published) or static
#: (calibrated once on text, cached): the HF path's default is the first, vLLM's the second
THINK_CHANNELS = ("query", "static")

# ---- A²ATS (VQ retrieval)
#: top-K per query head (fraction of the context < 1, or a count). A²ATS uses 0.03 on Llama-3.1-8B;
#: SmolLM2-135M's diffuse attention needs ~0.1 to keep full accuracy (README), the shipped default.
VQ_TOPK = 0.1
VQ_SINK = 8
VQ_LOCAL = 64
VQ_CODES = 256  # codebook size of the shipped SmolLM2 codebooks
VQ_REL_POS = 2048  # windowed RoPE: relative position every key is rotated to
VQ_DENSE_LAYERS = 2  # the first layers keep exact attention (their attention is not sparse)
VQ_SELECT = "codes"  # "oracle": exact-score top-K, an analysis baseline (saves nothing)
VQ_SELECTS = ("codes", "oracle")

# ---- quality harness
#: what a later turn of a shared-context (multi-query) sample follows: the gold answers (SCBench's multi-turn
#: protocol, the default) or the model's own answers
MQ_HISTORIES = ("gold", "model")


def check_head_dim(name: str, d: int) -> None:
    """Raise ValueError unless ``d`` is a head dim every kernel takes."""
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: head dim {d} is not supported (kvcomp's kernels take {list(SUPPORTED_HEAD_DIMS)})")
