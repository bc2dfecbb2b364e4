from .medurwkv import MedURWKVInfer  # noqa: F401
from .clicks import MedURWKVClicks, MedURWKVScribbles  # noqa: F401
