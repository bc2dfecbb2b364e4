"""Networks: the Vision-RWKV backbones (timm-registered on import) and the Med-URWKV U-shaped network."""

from .adapter import VisionRWKVAdapter  # noqa: F401  (registers vrwkv_adapter_* with timm)
from .vrwkv import VisionRWKV, checkpoint_filter_fn  # noqa: F401  (registers vrwkv_* with timm)

__all__ = ["VisionRWKV", "VisionRWKVAdapter", "checkpoint_filter_fn"]
