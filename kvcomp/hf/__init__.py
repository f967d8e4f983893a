"""Hugging Face transformers path: a compressed ``Cache`` and the ``kvcomp`` attention function."""

from .attention import compress as compress
from .attention import kvcomp_attention as kvcomp_attention
from .attention import register as register
from .attention import restore as restore
from .cache import KVCompCache as KVCompCache
from .cache import RopeInfo as RopeInfo
from .cache import dynamic_cache_bytes as dynamic_cache_bytes

__all__ = ["compress", "restore", "register", "kvcomp_attention", "KVCompCache", "RopeInfo", "dynamic_cache_bytes"]
