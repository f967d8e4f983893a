"""Pure-PyTorch references (fp32 math, GQA-aware, CPU or CUDA): the ground truth for every kernel.

Layouts and names follow docs/architecture.md, section "References (kvcomp/ref/)".
"""

from .attention import attention as attention
from .attention import gather_paged as gather_paged
from .attention import paged_attention as paged_attention
from .cache_write import streaming_slot as streaming_slot
from .cache_write import write_paged_kv as write_paged_kv
from .compressed_write import vq_encode_paged as vq_encode_paged
from .duo import duo_decode_attention as duo_decode_attention
from .duo import duo_head_map as duo_head_map
from .duo import ring_positions as ring_positions
from .think_paged import paged_pruned_key_attention as paged_pruned_key_attention
from .vq_paged import gather_codes as gather_codes
from .vq_paged import paged_exact_topk as paged_exact_topk
from .vq_paged import paged_vq_topk as paged_vq_topk
from .rope import apply_rope as apply_rope
from .rope import rope_cos_sin as rope_cos_sin
from .rope import unapply_rope as unapply_rope
from .rope import windowed_rope_query as windowed_rope_query
from .streaming import paged_streaming_attention as paged_streaming_attention
from .streaming import streaming_attention as streaming_attention
from .streaming import streaming_mask as streaming_mask
from .streaming import varlen_streaming_attention as varlen_streaming_attention
from .think import pack_pruned_keys as pack_pruned_keys
from .think import pruned_key_attention as pruned_key_attention
from .think import think_channel_scores as think_channel_scores
from .think import think_keep_channels as think_keep_channels
from .think import think_kept_dim as think_kept_dim
from .vq import mask_to_indices as mask_to_indices
from .vq import paged_sparse_attention as paged_sparse_attention
from .vq import sparse_attention as sparse_attention
from .vq import vq_encode as vq_encode
from .vq import vq_lut as vq_lut
from .vq import vq_scores as vq_scores
from .vq import vq_select as vq_select

__all__ = [
    "attention",
    "gather_paged",
    "paged_attention",
    "streaming_mask",
    "streaming_attention",
    "paged_streaming_attention",
    "varlen_streaming_attention",
    "think_channel_scores",
    "think_keep_channels",
    "think_kept_dim",
    "pack_pruned_keys",
    "pruned_key_attention",
    "rope_cos_sin",
    "apply_rope",
    "unapply_rope",
    "windowed_rope_query",
    "vq_encode",
    "vq_lut",
    "vq_scores",
    "vq_select",
    "mask_to_indices",
    "sparse_attention",
    "paged_sparse_attention",
    "duo_decode_attention",
    "duo_head_map",
    "ring_positions",
    "streaming_slot",
    "write_paged_kv",
    "paged_pruned_key_attention",
    "gather_codes",
    "paged_vq_topk",
    "paged_exact_topk",
    "vq_encode_paged",
]
