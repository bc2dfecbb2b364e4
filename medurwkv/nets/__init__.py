"""Networks: the Vision-RWKV backbones (timm-registered on import) and the Med-URWKV U-shaped network."""

from .adapter import VisionRWKVAdapter  # noqa: F401  (registers vrwkv_adapter_* with timm)
from .medurwkv import ENCODERS, AdapterEncoder, MedURWKV, PlainEncoder, UNetEncoder, enable_mc_dropout
from .vrwkv import VisionRWKV, checkpoint_filter_fn  # noqa: F401  (registers vrwkv_* with timm)

__all__ = [
    "VisionRWKV",
    "VisionRWKVAdapter",
    "checkpoint_filter_fn",
    "MedURWKV",
    "UNetEncoder",
    "AdapterEncoder",
    "PlainEncoder",
    "ENCODERS",
    "enable_mc_dropout",
]
