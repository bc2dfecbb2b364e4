"""One TaskConfig per model (the module name is the model name)."""

from .medurwkv import MedURWKVConfig, find_bundle  # noqa: F401
