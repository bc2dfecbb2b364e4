"""Med-URWKV: a pure-RWKV U-Net with ImageNet-pretrained Vision-RWKV encoders for medical image segmentation.

Importing the package registers the Vision-RWKV backbones with timm (``vrwkv_tiny`` ... ``vrwkv_large``,
``vrwkv_adapter_tiny`` ...).
"""

from . import nets  # noqa: F401  (timm registration)
from .ops import bi_wkv, bi_wkv_reference

__version__ = "0.1.0"
__all__ = ["bi_wkv", "bi_wkv_reference", "nets", "__version__"]
