"""One TaskConfig per model (the module name is the model name)."""

from .medurwkv import MedURWKVConfig, find_bundle  # noqa: F401
from .medurwkv2d import MedURWKV2dConfig, find_bundle2d  # noqa: F401
