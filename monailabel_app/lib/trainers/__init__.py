from .medurwkv import MedURWKVTrain  # noqa: F401
