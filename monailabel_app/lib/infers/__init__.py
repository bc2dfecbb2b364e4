from .medurwkv import MedURWKVInfer  # noqa: F401
